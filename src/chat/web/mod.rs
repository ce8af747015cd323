//! The web chat console: a chat adapter whose "platform" is a page served by
//! jitbot itself, for `jitbot demo`. Commands and button clicks from the page
//! take the same path as Slack's (text → `Command::parse` → `Engine::execute`),
//! and [`WebConsole`] is the notifier that shows the engine's messages there.
//!
//! The console has no sign-in (anyone picks who they are), so it is mounted
//! by the demo only. The dashboard ([`dashboard_routes`]) is useful in
//! production too, behind the admin token.

mod console;
mod dashboard;

pub use console::routes;
pub use dashboard::{dashboard_routes, DashboardAccess, DashboardView};

use crate::chat::render;
use crate::clock::Clock;
use crate::ports::{ApprovalCard, Audience, ChatError, MessageRef, Notice, Notifier};
use async_trait::async_trait;
use jitbot_core::command::Action;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// The platform name in [`MessageRef`]s and [`crate::ports::ChatRef`]s.
pub const PLATFORM: &str = "web";
/// The one channel of the console.
pub const CHANNEL: &str = "console";
/// Messages kept; older ones drop off the log.
const MAX_MESSAGES: usize = 500;

/// Where a console message is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    /// The shared channel, for a group's notices and approval cards.
    Channel,
    /// The shared channel, marked as a security alert.
    Alert,
    /// A direct message to one person.
    Direct,
}

/// A button as the page draws it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Button {
    /// The platform-neutral action id, e.g. `jit:approve:r-1`.
    pub action: String,
    pub label: &'static str,
    /// `primary`, `danger` or `plain`, for the page's styling.
    pub style: &'static str,
}

impl Button {
    fn of(action: &Action) -> Button {
        let style = match action {
            Action::Approve(_) | Action::Acknowledge(_) => "primary",
            Action::Deny(_) => "danger",
            Action::Extend(_) | Action::Release(_) => "plain",
        };
        Button {
            action: action.id(),
            label: render::button_label(action),
            style,
        }
    }
}

/// One message of the console log.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    /// The message number: stable, what [`MessageRef::id`] holds.
    pub id: u64,
    /// The log sequence number of the last change to this message; pages
    /// poll for changes after the last one they saw.
    pub seq: u64,
    pub at: String,
    pub place: Place,
    /// For a direct message, whom it is for.
    pub to: Option<String>,
    /// The group a channel message is about.
    pub group: Option<String>,
    pub text: String,
    pub buttons: Vec<Button>,
    /// Set on approval cards.
    pub card: Option<ApprovalCard>,
    /// How the page shows an approval card, worded by [`render`].
    pub view: Option<CardView>,
}

/// An approval card's title and labelled facts, worded by [`render`] as
/// on every other platform; the page adds only markup.
#[derive(Clone, Debug, Serialize)]
pub struct CardView {
    pub title: String,
    pub fields: Vec<(&'static str, String)>,
    /// The question of the page's deny form.
    pub deny_prompt: String,
}

impl CardView {
    fn of(card: &ApprovalCard) -> CardView {
        CardView {
            title: render::card_title(card),
            fields: render::fields(card),
            deny_prompt: render::deny_prompt(card.request.as_str()),
        }
    }
}

/// Changes since a sequence number, as `GET /api/messages` returns them.
#[derive(Clone, Debug, Serialize)]
pub struct Changes {
    /// The newest sequence number; the page asks for changes after it next.
    pub latest: u64,
    pub messages: Vec<Message>,
}

#[derive(Default)]
struct Log {
    messages: VecDeque<Message>,
    next_id: u64,
    seq: u64,
}

/// The console's notifier and message log (in memory, bounded).
pub struct WebConsole {
    log: Mutex<Log>,
    clock: Arc<dyn Clock>,
}

impl WebConsole {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        WebConsole {
            log: Mutex::new(Log::default()),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages added or changed after `after`; direct messages only for
    /// `user` (none when `user` is `None`).
    pub fn changes(&self, after: u64, user: Option<&str>) -> Changes {
        let log = self.lock();
        let messages = log
            .messages
            .iter()
            .filter(|m| m.seq > after)
            .filter(|m| m.place != Place::Direct || (user.is_some() && m.to.as_deref() == user))
            .cloned()
            .collect();
        Changes {
            latest: log.seq,
            messages,
        }
    }

    fn push(
        &self,
        place: Place,
        to: Option<String>,
        group: Option<String>,
        text: String,
        buttons: Vec<Button>,
        card: Option<ApprovalCard>,
    ) -> u64 {
        let at = self.clock.now().to_rfc3339();
        let mut log = self.lock();
        log.seq += 1;
        log.next_id += 1;
        let message = Message {
            id: log.next_id,
            seq: log.seq,
            at,
            place,
            to,
            group,
            text,
            buttons,
            view: card.as_ref().map(CardView::of),
            card,
        };
        log.messages.push_back(message);
        while log.messages.len() > MAX_MESSAGES {
            log.messages.pop_front();
        }
        log.next_id
    }

    fn card_text(card: &ApprovalCard) -> String {
        render::card_summary(card)
    }

    fn post(&self, card: &ApprovalCard) -> u64 {
        let buttons = card.buttons().iter().map(Button::of).collect();
        self.push(
            Place::Channel,
            None,
            Some(card.group.to_string()),
            Self::card_text(card),
            buttons,
            Some(card.clone()),
        )
    }
}

fn message_ref(id: u64) -> MessageRef {
    MessageRef {
        platform: PLATFORM.into(),
        channel: CHANNEL.into(),
        id: id.to_string(),
        copy: Default::default(),
    }
}

#[async_trait]
impl Notifier for WebConsole {
    /// The console has no DMs: every card goes to its one shared feed,
    /// whatever `approval_cards` says (`dm` and `both` act as `channel`).
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        Ok(vec![message_ref(self.post(card))])
    }

    async fn update_approval(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
        if at.platform != PLATFORM {
            return Ok(());
        }
        let id: Option<u64> = at.id.parse().ok();
        {
            let mut log = self.lock();
            log.seq += 1;
            let seq = log.seq;
            // By number first; after a restart (the log is memory only) the
            // card may still be found by its request, else it is posted anew.
            let index = log.messages.iter().rposition(|m| Some(m.id) == id).or_else(|| {
                log.messages
                    .iter()
                    .rposition(|m| m.card.as_ref().is_some_and(|c| c.request == card.request))
            });
            let target = index.and_then(|i| log.messages.get_mut(i));
            if let Some(m) = target {
                m.seq = seq;
                m.text = Self::card_text(card);
                m.buttons = card.buttons().iter().map(Button::of).collect();
                m.view = Some(CardView::of(card));
                m.card = Some(card.clone());
                return Ok(());
            }
        }
        self.post(card);
        Ok(())
    }

    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        let buttons = notice.buttons.iter().map(Button::of).collect();
        let text = render::notice_text(notice, render::Decoration::Plain);
        match &notice.to {
            Audience::User { user, .. } => {
                self.push(Place::Direct, Some(user.to_string()), None, text, buttons, None)
            }
            Audience::Group(group) => {
                self.push(Place::Channel, None, Some(group.to_string()), text, buttons, None)
            }
            Audience::Alert => self.push(Place::Alert, None, None, text, buttons, None),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use jitbot_core::{GroupName, RequestId, UserId};

    fn card(open: bool) -> ApprovalCard {
        ApprovalCard {
            request: RequestId::new("r-1"),
            group: GroupName::new("db-admins"),
            requester: UserId::new("alice"),
            duration: "1m".into(),
            reason: "testing".into(),
            extension: false,
            approvals: vec![],
            needed: 1,
            status: if open {
                "pending".into()
            } else {
                "approved by bob".into()
            },
            open,
            recipients: Default::default(),
        }
    }

    #[tokio::test]
    async fn cards_update_in_place_and_dms_stay_private() {
        let console = WebConsole::new(Arc::new(SystemClock));
        let at = console.post_approval(&card(true)).await.unwrap().remove(0);
        assert_eq!((at.platform.as_str(), at.channel.as_str()), ("web", "console"));
        let first = console.changes(0, None);
        assert_eq!(first.messages[0].buttons.len(), 2);
        console.update_approval(&at, &card(false)).await.unwrap();
        let after = console.changes(first.latest, None);
        assert_eq!(after.messages.len(), 1, "only the changed card");
        assert_eq!(after.messages[0].id.to_string(), at.id);
        assert!(after.messages[0].buttons.is_empty());

        let dm = Notice {
            to: Audience::User {
                user: UserId::new("alice"),
                chat: None,
            },
            text: "for alice".into(),
            buttons: vec![],
            tone: Default::default(),
        };
        console.send(&dm).await.unwrap();
        assert!(console.changes(after.latest, Some("bob")).messages.is_empty());
        assert_eq!(console.changes(after.latest, Some("alice")).messages.len(), 1);
    }

    #[tokio::test]
    async fn unknown_card_after_restart_is_posted_again() {
        let console = WebConsole::new(Arc::new(SystemClock));
        console
            .update_approval(&message_ref(42), &card(false))
            .await
            .unwrap();
        assert_eq!(console.changes(0, None).messages.len(), 1);
    }

    #[tokio::test]
    async fn log_is_bounded() {
        let console = WebConsole::new(Arc::new(SystemClock));
        for i in 0..MAX_MESSAGES + 10 {
            let n = Notice {
                to: Audience::Alert,
                text: format!("alert {i}"),
                buttons: vec![],
                tone: Default::default(),
            };
            console.send(&n).await.unwrap();
        }
        let all = console.changes(0, None).messages;
        assert_eq!(all.len(), MAX_MESSAGES);
        assert_eq!(all[0].text, "alert 10");
    }
}
