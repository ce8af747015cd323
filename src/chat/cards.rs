//! Posting an approval card to a group's channel and to approvers' DMs, the
//! same way on every platform: each platform says how to post one copy
//! ([`CardCopies`]); this module decides which copies go where, lists the
//! approvers no DM reached on the channel card, and remembers that list so
//! later updates of the channel card keep it.

use crate::ports::{ApprovalCard, ChatError, Contact, MessageRef};
use async_trait::async_trait;
use jitbot_core::UserId;
use std::collections::HashMap;
use std::sync::Mutex;

/// How one platform posts and edits the copies of an approval card.
#[async_trait]
pub trait CardCopies: Send + Sync {
    /// Posts the card in the group's channel.
    async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError>;
    /// Rewrites a posted copy.
    async fn rewrite(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError>;
    /// Sends the card to one approver by DM. The error says, for the log,
    /// why they could not be reached (no chat identity, lookup failed, …).
    async fn post_by_dm(&self, to: &Contact, card: &ApprovalCard) -> Result<MessageRef, String>;
}

/// Approvers not reached by DM, per channel card (`channel/id`), so updates
/// of that card keep listing them. In memory: after a restart, updates no
/// longer list them (the first post's copy did).
#[derive(Default)]
pub struct Unreachable(Mutex<HashMap<String, Vec<UserId>>>);

fn key(at: &MessageRef) -> String {
    format!("{}/{}", at.channel, at.id)
}

impl Unreachable {
    fn remember(&self, at: &MessageRef, users: Vec<UserId>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key(at), users);
        }
    }

    /// `card` as the copy at `at` shows it: with the approvers its first
    /// post listed. Forgets them once the card is decided (its last update).
    pub fn for_copy(&self, at: &MessageRef, card: &ApprovalCard) -> ApprovalCard {
        let mut card = card.clone();
        if let Ok(mut map) = self.0.lock() {
            let listed = if card.open {
                map.get(&key(at)).cloned()
            } else {
                map.remove(&key(at))
            };
            if let Some(users) = listed {
                card.recipients.unreachable = users;
            }
        }
        card
    }
}

/// Posts `card` where its [`crate::ports::Recipients`] say, on one platform:
/// the channel copy first when asked for (its failure fails the post, before
/// any DM), then one DM per approver. An approver no DM reaches is logged
/// and listed on the channel card, which is then posted (or rewritten) even
/// with `approval_cards = "dm"`; so is a card no DM reached at all. A DM
/// failure never fails the post. Returns every copy.
pub async fn post(
    platform: &str,
    copies: &dyn CardCopies,
    unreachable: &Unreachable,
    card: &ApprovalCard,
) -> Result<Vec<MessageRef>, ChatError> {
    let mut refs = Vec::new();
    let mut channel = None;
    if card.recipients.channel {
        let at = copies.post_in_channel(card).await?;
        refs.push(at.clone());
        channel = Some(at);
    }
    let mut missed = Vec::new();
    for to in &card.recipients.dm {
        match copies.post_by_dm(to, card).await {
            Ok(at) => refs.push(at),
            Err(why) => {
                tracing::warn!(
                    platform,
                    request = %card.request,
                    approver = %to.user,
                    reason = %why,
                    "approver not reached by DM; the channel card lists them"
                );
                missed.push(to.user.clone());
            }
        }
    }
    let dms = refs.len() - usize::from(channel.is_some());
    if missed.is_empty() && (channel.is_some() || dms > 0) {
        return Ok(refs);
    }
    let mut listed = card.clone();
    listed.recipients.unreachable = missed.clone();
    match channel {
        Some(at) => {
            // The channel copy went out before the DMs were tried.
            if let Err(e) = copies.rewrite(&at, &listed).await {
                tracing::warn!(platform, request = %card.request, error = %e, "cannot list the approvers no DM reached on the channel card");
            }
            unreachable.remember(&at, missed);
        }
        None => {
            if dms == 0 {
                tracing::info!(platform, request = %card.request, "no approver got this card by DM; posting it in the channel");
            }
            let at = copies.post_in_channel(&listed).await?;
            if !missed.is_empty() {
                unreachable.remember(&at, missed);
            }
            refs.push(at);
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Recipients;
    use jitbot_core::{GroupName, RequestId};

    /// Records what was posted where; DMs to `closed` fail; the channel
    /// fails when `channel_down`.
    #[derive(Default)]
    struct Copies {
        log: Mutex<Vec<String>>,
        closed: Vec<&'static str>,
        channel_down: bool,
    }

    fn at(channel: &str) -> MessageRef {
        MessageRef {
            platform: "test".into(),
            channel: channel.into(),
            id: "1".into(),
        }
    }

    #[async_trait]
    impl CardCopies for Copies {
        async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
            if self.channel_down {
                return Err(ChatError::Unavailable("down".into()));
            }
            let listed: Vec<&str> = card.recipients.unreachable.iter().map(|u| u.as_str()).collect();
            self.log.lock().unwrap().push(format!("channel {listed:?}"));
            Ok(at("C"))
        }
        async fn rewrite(&self, _: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
            let listed: Vec<&str> = card.recipients.unreachable.iter().map(|u| u.as_str()).collect();
            self.log.lock().unwrap().push(format!("rewrite {listed:?}"));
            Ok(())
        }
        async fn post_by_dm(&self, to: &Contact, _: &ApprovalCard) -> Result<MessageRef, String> {
            self.log.lock().unwrap().push(format!("dm {}", to.user));
            if self.closed.contains(&to.user.as_str()) {
                return Err("closed".into());
            }
            Ok(at(&format!("D{}", to.user)))
        }
    }

    fn card(channel: bool, dm: &[&str]) -> ApprovalCard {
        ApprovalCard {
            request: RequestId::new("r-1"),
            group: GroupName::new("db"),
            requester: UserId::new("alice"),
            duration: "1h".into(),
            reason: "x".into(),
            extension: false,
            approvals: vec![],
            needed: 1,
            status: "pending".into(),
            open: true,
            recipients: Recipients {
                channel,
                dm: dm
                    .iter()
                    .map(|u| Contact {
                        user: UserId::new(*u),
                        attributes: Default::default(),
                    })
                    .collect(),
                unreachable: vec![],
            },
        }
    }

    async fn run(copies: &Copies, card: &ApprovalCard) -> (Result<Vec<MessageRef>, ChatError>, Vec<String>) {
        let seen = Unreachable::default();
        let r = post("test", copies, &seen, card).await;
        (r, copies.log.lock().unwrap().clone())
    }

    #[tokio::test]
    async fn which_copies_go_where() {
        // dm, all reached: no channel copy.
        let (r, log) = run(&Copies::default(), &card(false, &["bob", "carol"])).await;
        assert_eq!(log, ["dm bob", "dm carol"]);
        assert_eq!(r.unwrap().len(), 2);
        // dm, nobody to DM: the channel.
        let (r, log) = run(&Copies::default(), &card(false, &[])).await;
        assert_eq!(log, ["channel []"]);
        assert_eq!(r.unwrap().len(), 1);
        // dm, one unreachable: the channel lists them.
        let copies = Copies {
            closed: vec!["carol"],
            ..Copies::default()
        };
        let (r, log) = run(&copies, &card(false, &["bob", "carol"])).await;
        assert_eq!(log, ["dm bob", "dm carol", "channel [\"carol\"]"]);
        assert_eq!(r.unwrap().len(), 2);
        // both, one unreachable: channel first, then rewritten.
        let copies = Copies {
            closed: vec!["bob"],
            ..Copies::default()
        };
        let (r, log) = run(&copies, &card(true, &["bob", "carol"])).await;
        assert_eq!(log, ["channel []", "dm bob", "dm carol", "rewrite [\"bob\"]"]);
        assert_eq!(r.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_channel_post_fails_before_any_dm() {
        let copies = Copies {
            channel_down: true,
            ..Copies::default()
        };
        let (r, log) = run(&copies, &card(true, &["bob"])).await;
        assert!(r.is_err());
        assert!(log.is_empty(), "{log:?}");
    }

    #[test]
    fn updates_keep_the_list_until_decided() {
        let seen = Unreachable::default();
        seen.remember(&at("C"), vec![UserId::new("bob")]);
        let mut c = card(true, &[]);
        assert_eq!(
            seen.for_copy(&at("C"), &c).recipients.unreachable,
            [UserId::new("bob")]
        );
        assert!(seen.for_copy(&at("Dx"), &c).recipients.unreachable.is_empty());
        c.open = false;
        assert_eq!(
            seen.for_copy(&at("C"), &c).recipients.unreachable,
            [UserId::new("bob")]
        );
        assert!(
            seen.for_copy(&at("C"), &c).recipients.unreachable.is_empty(),
            "forgotten once decided"
        );
    }
}
