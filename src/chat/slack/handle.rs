//! What jitbot does with a slash command or a click, whichever mode it came
//! through. The accept step is synchronous and cheap (parse, dedupe, spawn)
//! so the caller can acknowledge Slack at once; the work runs in a task and
//! answers through `response_url`, an ephemeral message or a DM.

use super::binding::{self, Binding, Mismatch};
use super::blocks::{self, DENY_MODAL, DURATION_INPUT, GROUP_INPUT, REASON_INPUT, REQUEST_MODAL};
use super::{SlackAdapter, PLATFORM};
use crate::chat::inbound::{self, Click};
use crate::chat::render;
use crate::engine::{Caller, Engine};
use crate::ports::ChatRef;
use jitbot_core::command::{Action, Command, ParseError, MAX_REASON_CHARS};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// A slash command's fields, from the HTTP form or a Socket Mode envelope.
#[derive(Clone, Debug)]
pub struct SlashCommand {
    pub user_id: String,
    pub channel_id: String,
    pub text: String,
    pub response_url: String,
    pub trigger_id: String,
    /// The workspace, app and org the payload claims (checked against config).
    pub origin: binding::Origin,
}

/// Why an interaction payload was refused outright (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("malformed interaction payload: {0}")]
    Malformed(String),
    #[error("unknown action `{0}`")]
    UnknownAction(String),
    /// Signed, but from another workspace, app or org (HTTP 403).
    #[error("{}", .0.user_message())]
    Foreign(Mismatch),
}

/// Shared by HTTP mode and Socket Mode: one place that turns Slack payloads
/// into engine commands.
pub struct SlackHandler {
    engine: Engine,
    adapter: Arc<SlackAdapter>,
    binding: Binding,
}

/// Where an answer goes.
enum Answer {
    Url(String),
    Ephemeral { channel: String, user: String },
    Dm(String),
}

/// Carried in a modal's `private_metadata`, which Slack hands back on submit.
#[derive(Serialize, Deserialize, Default)]
struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Payload {
    #[serde(rename = "block_actions")]
    BlockActions(BlockActions),
    #[serde(rename = "view_submission")]
    ViewSubmission(ViewSubmission),
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Deserialize)]
struct BlockActions {
    user: IdOnly,
    trigger_id: String,
    response_url: Option<String>,
    channel: Option<IdOnly>,
    actions: Vec<ActionInfo>,
}

#[derive(Deserialize)]
struct ActionInfo {
    action_id: String,
    action_ts: Option<String>,
}

#[derive(Deserialize)]
struct ViewSubmission {
    user: IdOnly,
    view: View,
}

#[derive(Deserialize)]
struct View {
    id: String,
    callback_id: Option<String>,
    #[serde(default)]
    private_metadata: String,
    state: Option<ViewState>,
}

#[derive(Deserialize)]
struct ViewState {
    values: HashMap<String, HashMap<String, StateValue>>,
}

#[derive(Deserialize)]
struct StateValue {
    value: Option<String>,
}

impl View {
    fn input(&self, id: &str) -> String {
        self.state
            .as_ref()
            .and_then(|s| s.values.get(id))
            .and_then(|b| b.get(id))
            .and_then(|v| v.value.clone())
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// A modal submission, checked and ready to run.
enum Submission {
    Deny {
        request: String,
        reason: String,
    },
    Request {
        group: String,
        duration: String,
        reason: String,
    },
}

impl SlackHandler {
    pub fn new(engine: Engine, adapter: Arc<SlackAdapter>) -> Arc<SlackHandler> {
        let binding = Binding::new(adapter.config());
        Arc::new(SlackHandler {
            engine,
            adapter,
            binding,
        })
    }

    /// Checks the payload's workspace, app, org and user against config;
    /// a refusal is logged and counted like a bad signature.
    fn bound(&self, origin: &binding::Origin) -> Result<(), Mismatch> {
        self.binding.check(origin).map_err(|mismatch| {
            tracing::warn!(reason = mismatch.kind(), %mismatch, "refused a Slack payload from outside the configured workspace");
            crate::metrics::refused_payload(PLATFORM, mismatch.kind());
            mismatch
        })
    }

    /// True the first time a payload id is seen within the replay window
    /// (Slack's retries and captured replays carry the same id). Recorded
    /// durably, so a restart forgets nothing. Fails closed: a payload whose
    /// id cannot be recorded is dropped.
    async fn first_time(&self, key: String) -> bool {
        let now = self.engine.now();
        let until = crate::store::seen::REPLAY_WINDOW.after(now);
        match self
            .engine
            .store()
            .first_sighting(&format!("slack:{key}"), until, now)
            .await
        {
            Ok(first) => first,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a Slack payload id against replays; the payload was dropped (check the store's disk)");
                false
            }
        }
    }

    /// Accepts a slash command and starts its work. `Ok(false)` for a
    /// retry or replay of a command already taken (same `trigger_id`);
    /// `Err` for a command from another workspace or app.
    pub async fn command(self: &Arc<Self>, cmd: SlashCommand) -> Result<bool, Rejected> {
        self.bound(&cmd.origin).map_err(Rejected::Foreign)?;
        if !self.first_time(format!("cmd:{}", cmd.trigger_id)).await {
            tracing::info!("Slack retried a slash command already taken; ignored");
            return Ok(false);
        }
        let this = self.clone();
        crate::chat::work::spawn(async move { this.run_command(cmd).await });
        Ok(true)
    }

    /// Accepts an interaction payload (`payload=` JSON in HTTP mode, the
    /// envelope's payload in Socket Mode). `Ok(false)` means a retry or a
    /// kind jitbot ignores; errors mean nothing was started.
    pub async fn interaction(self: &Arc<Self>, payload: serde_json::Value) -> Result<bool, Rejected> {
        let origin = binding::Origin::of_interaction(&payload);
        self.interaction_from(payload, origin).await
    }

    /// An interaction that arrived over Socket Mode: the socket is opened
    /// with this app's token, so the app is given (slack-morphism's typed
    /// `view_submission` drops `api_app_id`); the workspace is still checked.
    pub async fn socket_interaction(self: &Arc<Self>, payload: serde_json::Value) -> Result<bool, Rejected> {
        let mut origin = binding::Origin::of_interaction(&payload);
        origin.app = None;
        self.interaction_from(payload, origin).await
    }

    async fn interaction_from(
        self: &Arc<Self>,
        payload: serde_json::Value,
        origin: binding::Origin,
    ) -> Result<bool, Rejected> {
        let Decoded(work) = decode_interaction(payload)?;
        match self.bound(&origin) {
            Ok(()) => {}
            // A Slack Connect user clicked a card shared into their
            // workspace: the payload is genuine, so tell them why not.
            Err(external @ Mismatch::ExternalUser { .. }) => {
                if let Some(answer) = work.answer() {
                    let this = self.clone();
                    crate::chat::work::spawn(
                        async move { this.answer(&answer, &external.user_message()).await },
                    );
                }
                return Ok(false);
            }
            Err(other) => return Err(Rejected::Foreign(other)),
        }
        match work {
            Work::Click { ba, action, key } => {
                if !self.first_time(key).await {
                    tracing::info!("Slack retried (or someone replayed) a click already taken; ignored");
                    return Ok(false);
                }
                let this = self.clone();
                crate::chat::work::spawn(async move { this.run_action(ba, action).await });
                Ok(true)
            }
            Work::Submit {
                user,
                channel,
                submission,
                key,
            } => {
                if !self.first_time(key).await {
                    return Ok(false);
                }
                let this = self.clone();
                crate::chat::work::spawn(async move { this.run_submission(user, channel, submission).await });
                Ok(true)
            }
            Work::Ignored => Ok(false),
        }
    }

    async fn run_command(&self, cmd: SlashCommand) {
        let answer = Answer::Url(cmd.response_url.clone());
        let command = match Command::parse(&cmd.text) {
            Ok(c) => c,
            Err(ParseError::Usage(usage)) if is_bare_request(&cmd.text) => {
                let meta = Metadata {
                    request: None,
                    channel: Some(cmd.channel_id.clone()),
                };
                let meta = serde_json::to_string(&meta).unwrap_or_default();
                if let Err(e) = self
                    .adapter
                    .open_view(&cmd.trigger_id, blocks::request_modal(meta))
                    .await
                {
                    tracing::warn!(error = %e, "cannot open the request modal");
                    self.answer(&answer, &format!("usage: {usage}")).await;
                }
                return;
            }
            Err(e) => return self.answer(&answer, &e.to_string()).await,
        };
        let text = self
            .execute(&cmd.user_id, Some(cmd.channel_id.clone()), command)
            .await;
        self.answer(&answer, &text).await;
    }

    async fn run_action(&self, ba: BlockActions, action: Action) {
        let channel = ba.channel.map(|c| c.id);
        let answer = match (&ba.response_url, &channel) {
            (Some(url), _) => Answer::Url(url.clone()),
            (None, Some(channel)) => Answer::Ephemeral {
                channel: channel.clone(),
                user: ba.user.id.clone(),
            },
            (None, None) => Answer::Dm(ba.user.id.clone()),
        };
        let text = match inbound::click(&self.engine, &action) {
            Click::Run(command) => self.execute(&ba.user.id, channel, command).await,
            Click::Answer(text) => text.to_string(),
            Click::AskDenyReason { request } => {
                let meta = Metadata {
                    request: Some(request.clone()),
                    channel: channel.clone(),
                };
                let meta = serde_json::to_string(&meta).unwrap_or_default();
                match self
                    .adapter
                    .open_view(&ba.trigger_id, blocks::deny_modal(&request, meta))
                    .await
                {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the deny modal");
                        render::deny_form_failed("Slack", &e, &request)
                    }
                }
            }
        };
        self.answer(&answer, &text).await;
    }

    async fn run_submission(&self, user: String, channel: Option<String>, submission: Submission) {
        let answer = match &channel {
            Some(channel) => Answer::Ephemeral {
                channel: channel.clone(),
                user: user.clone(),
            },
            None => Answer::Dm(user.clone()),
        };
        let command = match submission {
            Submission::Deny { request, reason } => inbound::deny(&request, &reason),
            Submission::Request {
                group,
                duration,
                reason,
            } => request_from_form(&group, &duration, &reason).map_err(|e| e.to_string()),
        };
        let text = match command {
            Ok(command) => self.execute(&user, channel, command).await,
            Err(text) => text,
        };
        self.answer(&answer, &text).await;
    }

    /// Identifies the Slack user in the directory and runs the command.
    async fn execute(&self, slack_user: &str, channel: Option<String>, command: Command) -> String {
        if command == Command::Help {
            return jitbot_core::command::HELP.to_string();
        }
        let email = match self.adapter.email_of(slack_user).await {
            Ok(Some(email)) => email,
            Ok(None) => return render::no_profile_email("Slack"),
            Err(e) => return render::lookup_failed("Slack", &e),
        };
        let user = match self
            .engine
            .identify(&self.adapter.config().user_attribute, &email)
            .await
        {
            Ok(user) => user,
            Err(reply) => return reply.text,
        };
        let caller = Caller {
            user,
            chat: Some(ChatRef {
                platform: PLATFORM.into(),
                user: slack_user.to_string(),
                channel,
            }),
        };
        self.engine.execute(&caller, command).await.text
    }

    async fn answer(&self, to: &Answer, text: &str) {
        let sent = match to {
            Answer::Url(url) => self.adapter.respond(url, text).await,
            Answer::Ephemeral { channel, user } => self.adapter.ephemeral(channel, user, text).await,
            Answer::Dm(user) => {
                let content =
                    slack_morphism::prelude::SlackMessageContent::new().with_text(blocks::escape(text));
                self.adapter.dm(user, content).await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot answer on Slack");
        }
    }
}

/// An interaction payload, decoded and checked, before anything runs.
pub struct Decoded(Work);

enum Work {
    Click {
        ba: BlockActions,
        action: Action,
        /// Dedupe key: Slack retries carry the same `action_ts`.
        key: String,
    },
    Submit {
        user: String,
        channel: Option<String>,
        submission: Submission,
        key: String,
    },
    Ignored,
}

impl Work {
    /// Where to tell the user something about this payload.
    fn answer(&self) -> Option<Answer> {
        match self {
            Work::Click { ba, .. } => Some(match (&ba.response_url, &ba.channel) {
                (Some(url), _) => Answer::Url(url.clone()),
                (None, Some(channel)) => Answer::Ephemeral {
                    channel: channel.id.clone(),
                    user: ba.user.id.clone(),
                },
                (None, None) => Answer::Dm(ba.user.id.clone()),
            }),
            Work::Submit { user, channel, .. } => Some(match channel {
                Some(channel) => Answer::Ephemeral {
                    channel: channel.clone(),
                    user: user.clone(),
                },
                None => Answer::Dm(user.clone()),
            }),
            Work::Ignored => None,
        }
    }
}

/// Decodes an interaction payload without side effects: what the HTTP
/// endpoint and Socket Mode both start from (and what the fuzz target feeds).
pub fn decode_interaction(payload: serde_json::Value) -> Result<Decoded, Rejected> {
    let payload: Payload = serde_json::from_value(payload).map_err(|e| Rejected::Malformed(e.to_string()))?;
    let work = match payload {
        Payload::BlockActions(ba) => {
            let Some(first) = ba.actions.first() else {
                return Err(Rejected::Malformed("block_actions without actions".into()));
            };
            let action = Action::parse(&first.action_id)
                .map_err(|_| Rejected::UnknownAction(first.action_id.clone()))?;
            let key = format!(
                "act:{}",
                first.action_ts.clone().unwrap_or_else(|| ba.trigger_id.clone())
            );
            Work::Click { ba, action, key }
        }
        Payload::ViewSubmission(vs) => {
            let meta: Metadata = if vs.view.private_metadata.is_empty() {
                Metadata::default()
            } else {
                serde_json::from_str(&vs.view.private_metadata)
                    .map_err(|_| Rejected::Malformed("private_metadata".into()))?
            };
            let submission = match vs.view.callback_id.as_deref() {
                Some(DENY_MODAL) => Submission::Deny {
                    request: meta
                        .request
                        .clone()
                        .ok_or_else(|| Rejected::Malformed("deny modal without a request".into()))?,
                    reason: vs.view.input(REASON_INPUT),
                },
                Some(REQUEST_MODAL) => Submission::Request {
                    group: vs.view.input(GROUP_INPUT),
                    duration: vs.view.input(DURATION_INPUT),
                    reason: vs.view.input(REASON_INPUT),
                },
                other => return Err(Rejected::UnknownAction(other.unwrap_or_default().to_string())),
            };
            Work::Submit {
                user: vs.user.id,
                channel: meta.channel,
                submission,
                key: format!("view:{}", vs.view.id),
            }
        }
        Payload::Other => Work::Ignored,
    };
    Ok(Decoded(work))
}

/// Reads a slash command's form body; `None` when a required field is missing.
pub fn decode_command(body: &[u8]) -> Option<SlashCommand> {
    let mut form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let mut take = |k: &str| form.remove(k).filter(|v| !v.is_empty());
    let origin = binding::Origin {
        team: take("team_id"),
        // Slack always sends it over HTTP: a missing one reads as empty.
        app: Some(take("api_app_id").unwrap_or_default()),
        enterprise: take("enterprise_id"),
        user_team: None,
    };
    Some(SlashCommand {
        origin,
        user_id: take("user_id")?,
        channel_id: take("channel_id")?,
        response_url: take("response_url")?,
        trigger_id: take("trigger_id")?,
        text: take("text").unwrap_or_default(),
    })
}

fn is_bare_request(text: &str) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    matches!(words.as_slice(), [verb] if verb.eq_ignore_ascii_case("request") || verb.eq_ignore_ascii_case("req"))
}

/// The request modal's fields as a command, checked by the same parser as
/// the slash command (names, durations) while keeping the reason verbatim:
/// a reason that starts with a digit must not be read as a duration.
fn request_from_form(group: &str, duration: &str, reason: &str) -> Result<Command, ParseError> {
    if group.split_whitespace().count() != 1 {
        return Err(ParseError::Usage("one group name, e.g. db-admins"));
    }
    if duration.split_whitespace().count() > 1 {
        return Err(ParseError::Usage("one duration, e.g. 2h"));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ParseError::ReasonTooLong);
    }
    // The duration box holds a duration or nothing: parse it as one, so a
    // typo is refused rather than taken as the start of the reason.
    let duration = match duration {
        "" => None,
        d => Some(d.parse::<jitbot_core::Span>()?),
    };
    match Command::parse(&format!("request {group} -"))? {
        Command::Request { group, .. } => Ok(Command::Request {
            group,
            duration,
            reason: reason.to_string(),
        }),
        _ => Err(ParseError::Usage("/jit request <group> [duration] <reason>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitbot_core::{GroupName, Span};

    #[test]
    fn the_request_form_becomes_a_request() {
        let cmd = request_from_form("db-admins", "2h", "3 replicas down").unwrap();
        assert_eq!(
            cmd,
            Command::Request {
                group: GroupName::new("db-admins"),
                duration: Some(Span::from_hours(2)),
                reason: "3 replicas down".into()
            }
        );
        let cmd = request_from_form("db-admins", "", "3 replicas down").unwrap();
        assert!(
            matches!(cmd, Command::Request { duration: None, ref reason, .. } if reason == "3 replicas down")
        );
        assert!(request_from_form("db admins", "", "x").is_err());
        assert!(request_from_form("db", "soon", "x").is_err());
        assert!(request_from_form("*)(uid=*", "", "x").is_err());
    }

    #[test]
    fn only_a_bare_request_opens_the_modal() {
        assert!(is_bare_request(" request "));
        assert!(!is_bare_request("request db"));
        assert!(!is_bare_request("deny"));
    }
}
