//! What jitbot does with an interaction, whichever way it arrived (HTTP
//! endpoint or gateway): one [`DiscordHandler::handle`] that returns the
//! interaction response, plus the work still running when that response had
//! to be deferred to meet Discord's 3-second limit.

use super::command::{self, to_command};
use super::interaction::{Incoming, Invocation, Origin, Rejected};
use super::message::{self, DENY_MODAL_PREFIX, REASON_INPUT};
use super::{DiscordAdapter, PLATFORM};
use crate::chat::inbound::{self, Click};
use crate::chat::render;
use crate::engine::{Caller, Engine};
use crate::ports::ChatRef;
use jitbot_core::command::{Action, Command};
use jitbot_core::policy::Actor;
use jitbot_core::UserId;
use serde_json::Value;
use serenity::all::{AutocompleteChoice, CreateAutocompleteResponse, CreateInteractionResponse};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Discord shows at most 25 autocomplete choices.
const MAX_CHOICES: usize = 25;
/// Autocomplete cannot be deferred: past this, answer with no choices.
const AUTOCOMPLETE_BUDGET: Duration = Duration::from_millis(2500);

/// Work that finishes a deferred answer; run it after the response is sent.
pub type Later = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The interaction response, and the work that edits it later if deferred.
/// Until it is dropped (after the response is sent), a replay of the
/// interaction is ignored rather than told it was already handled.
pub struct Outcome {
    pub response: Value,
    pub later: Option<Later>,
    answering: Option<Answering>,
}

impl Outcome {
    fn now(response: CreateInteractionResponse) -> Outcome {
        Outcome {
            response: message::to_json(&response),
            later: None,
            answering: None,
        }
    }

    fn answering(mut self, guard: Option<Answering>) -> Outcome {
        self.answering = guard;
        self
    }
}

/// Interaction ids whose first delivery is being answered.
type Answered = Arc<Mutex<HashSet<String>>>;

/// Marks an interaction as being answered until dropped.
struct Answering {
    id: String,
    set: Answered,
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.id);
        }
    }
}

/// Turns interactions into engine commands; shared by both modes.
pub struct DiscordHandler {
    engine: Engine,
    adapter: Arc<DiscordAdapter>,
    answering: Answered,
}

impl DiscordHandler {
    pub fn new(engine: Engine, adapter: Arc<DiscordAdapter>) -> Arc<DiscordHandler> {
        Arc::new(DiscordHandler {
            engine,
            adapter,
            answering: Answered::default(),
        })
    }

    /// Handles one interaction. `Err` means nothing was started and the
    /// payload should be refused (HTTP 400).
    pub async fn handle(self: &Arc<Self>, incoming: Incoming) -> Result<Outcome, Rejected> {
        let mut guard = None;
        if let Some(origin) = acting_origin(&incoming) {
            // Marked before the durable check, so a replay racing the
            // first delivery finds it in flight.
            let marked = self
                .answering
                .lock()
                .map(|mut set| set.insert(origin.id.clone()))
                .unwrap_or(false);
            if !marked {
                return Err(Rejected::InFlight(origin.id.clone()));
            }
            let answering = Answering {
                id: origin.id.clone(),
                set: self.answering.clone(),
            };
            if !self.first_time(&origin.id).await {
                tracing::info!("a Discord interaction arrived twice (a replay); ignored");
                return Ok(Outcome::now(message::ephemeral(render::ALREADY_HANDLED)));
            }
            guard = Some(answering);
        }
        self.handle_first(incoming).await.map(|o| o.answering(guard))
    }

    /// Handles the first delivery of an interaction.
    async fn handle_first(self: &Arc<Self>, incoming: Incoming) -> Result<Outcome, Rejected> {
        match incoming {
            Incoming::Ping => Ok(Outcome {
                response: message::pong(),
                later: None,
                answering: None,
            }),
            Incoming::Command(inv) => {
                check_name(&inv)?;
                match to_command(&inv) {
                    Ok(Command::Help) => Ok(Outcome::now(message::ephemeral(jitbot_core::command::HELP))),
                    Ok(cmd) => Ok(self.run(inv.origin, cmd).await),
                    Err(e) => Ok(Outcome::now(message::ephemeral(&e.to_string()))),
                }
            }
            Incoming::Autocomplete(inv) => {
                check_name(&inv)?;
                Ok(Outcome::now(self.autocomplete(&inv).await))
            }
            Incoming::Button { origin, custom_id } => {
                let action =
                    Action::parse(&custom_id).map_err(|_| Rejected::UnknownComponent(custom_id.clone()))?;
                match inbound::click(&self.engine, &action) {
                    Click::Run(cmd) => Ok(self.run(origin, cmd).await),
                    Click::AskDenyReason { request } => Ok(Outcome::now(message::deny_modal(&request))),
                    Click::Answer(text) => Ok(Outcome::now(message::ephemeral(text))),
                }
            }
            Incoming::Modal {
                origin,
                custom_id,
                fields,
            } => {
                let request = custom_id
                    .strip_prefix(DENY_MODAL_PREFIX)
                    .filter(|r| Action::parse(&Action::Deny(r.to_string()).id()).is_ok())
                    .ok_or_else(|| Rejected::UnknownComponent(custom_id.clone()))?;
                let reason = fields.get(REASON_INPUT).map(String::as_str).unwrap_or_default();
                match inbound::deny(request, reason) {
                    Ok(cmd) => Ok(self.run(origin, cmd).await),
                    Err(text) => Ok(Outcome::now(message::ephemeral(&text))),
                }
            }
        }
    }

    /// True the first time an interaction id is seen within the replay
    /// window, recorded durably. Fails closed when the store cannot record it.
    async fn first_time(&self, interaction: &str) -> bool {
        let now = self.engine.now();
        let until = crate::store::seen::REPLAY_WINDOW.after(now);
        match self
            .engine
            .store()
            .first_sighting(&format!("discord:{interaction}"), until, now)
            .await
        {
            Ok(first) => first,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a Discord interaction id against replays; the interaction was dropped (check the store's disk)");
                false
            }
        }
    }

    /// Runs a command; answers with its reply if it is done within the
    /// adapter's budget, else defers and edits the original response later.
    async fn run(self: &Arc<Self>, origin: Origin, cmd: Command) -> Outcome {
        let this = self.clone();
        let o = origin.clone();
        let mut work = crate::chat::work::spawn(async move { this.execute(&o, cmd).await });
        match tokio::time::timeout(self.adapter.answer_budget(), &mut work).await {
            Ok(Ok(text)) => Outcome::now(message::ephemeral(&text)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "Discord command task failed");
                Outcome::now(message::ephemeral(render::FAILED_TO_RUN))
            }
            Err(_) => {
                let adapter = self.adapter.clone();
                let later: Later = Box::pin(async move {
                    let text = work.await.unwrap_or_else(|_| render::FAILED_TO_RUN.to_string());
                    if let Err(e) = adapter.edit_original(&origin.token, &text).await {
                        tracing::warn!(error = %e, "cannot edit the deferred Discord answer");
                    }
                });
                Outcome {
                    response: message::to_json(&message::deferred()),
                    later: Some(later),
                    answering: None,
                }
            }
        }
    }

    /// The directory account of a Discord user: the static map first, then
    /// the configured directory attribute.
    async fn identify(&self, discord_user: &str) -> Result<UserId, String> {
        let config = self.adapter.config();
        if let Some(user) = config.users.get(discord_user) {
            return Ok(UserId::new(user));
        }
        match &config.user_attribute {
            Some(attribute) => self
                .engine
                .identify(attribute, discord_user)
                .await
                .map_err(|r| r.text),
            None => Err(render::unknown_chat_user("Discord", discord_user)),
        }
    }

    async fn execute(&self, origin: &Origin, cmd: Command) -> String {
        let user = match self.identify(&origin.user).await {
            Ok(user) => user,
            Err(text) => return text,
        };
        let caller = Caller {
            user,
            chat: Some(ChatRef {
                platform: PLATFORM.into(),
                user: origin.user.clone(),
                channel: origin.channel.clone(),
            }),
        };
        self.engine.execute(&caller, cmd).await.text
    }

    /// Choices for the `group` option: the groups this user may request
    /// whose name contains what they typed.
    async fn autocomplete(&self, inv: &Invocation) -> CreateInteractionResponse {
        let typed = inv
            .focused
            .as_ref()
            .and_then(|f| inv.options.get(f))
            .map(|t| t.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let groups = if inv.focused.as_deref() == Some("group") {
            tokio::time::timeout(AUTOCOMPLETE_BUDGET, self.requestable(&inv.origin.user))
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let choices = groups
            .into_iter()
            .filter(|g| g.to_ascii_lowercase().contains(&typed))
            .take(MAX_CHOICES)
            .map(|g| AutocompleteChoice::new(g.clone(), g))
            .collect();
        CreateInteractionResponse::Autocomplete(CreateAutocompleteResponse::new().set_choices(choices))
    }

    /// The groups `discord_user` may request; empty when unknown.
    async fn requestable(&self, discord_user: &str) -> Vec<String> {
        let Ok(user) = self.identify(discord_user).await else {
            return Vec::new();
        };
        let policy = self.engine.policy();
        let mentioned = policy.mentioned_groups();
        let groups = if mentioned.is_empty() {
            Default::default()
        } else {
            match self.engine.directory().groups_of(&user, &mentioned).await {
                Ok(groups) => groups,
                Err(e) => {
                    tracing::warn!(error = %e, "autocomplete: cannot read directory groups");
                    return Vec::new();
                }
            }
        };
        let actor = Actor { user, groups };
        policy
            .groups
            .iter()
            .filter(|g| g.may_request(&actor))
            .map(|g| g.name.to_string())
            .collect()
    }
}

/// The origin of an interaction that can change something (commands,
/// buttons, modal submits); pings and autocomplete only read.
fn acting_origin(incoming: &Incoming) -> Option<&Origin> {
    match incoming {
        Incoming::Command(inv) => Some(&inv.origin),
        Incoming::Button { origin, .. } | Incoming::Modal { origin, .. } => Some(origin),
        Incoming::Ping | Incoming::Autocomplete(_) => None,
    }
}

fn check_name(inv: &Invocation) -> Result<(), Rejected> {
    if inv.command == command::NAME {
        Ok(())
    } else {
        Err(Rejected::UnknownCommand(inv.command.chars().take(40).collect()))
    }
}
