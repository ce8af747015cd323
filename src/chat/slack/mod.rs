//! The Slack adapter: Block Kit messages out through the Web API
//! (slack-morphism), slash commands and clicks in through HTTP mode or
//! Socket Mode. Both modes hand their payloads to one [`handle`] module.

pub mod binding;
pub mod blocks;
mod handle;
mod http;
pub mod signature;
mod socket;

pub use handle::{decode_command, decode_interaction, Decoded, SlackHandler, SlashCommand};
pub use http::{routes, BODY_LIMIT};
pub use signature::{verify_signature, SignatureError};
pub use socket::run_socket_mode;

use crate::chat::cards::{self, CardCopies, DmError};
use crate::config::SlackConfig;
use crate::ports::{
    ApprovalCard, Audience, ChatError, Contact, CopyLog, MessageRef, Notice, Notifier, PostError,
};
use crate::secret::{Secret, SecretError};
use async_trait::async_trait;
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The platform name in [`MessageRef`] and [`crate::ports::ChatRef`].
pub const PLATFORM: &str = "slack";

/// slack-morphism's hyper client over a connector that speaks HTTPS to Slack
/// and plain HTTP to a local fake or a proxy on loopback.
pub type Client = SlackClient<SlackClientHyperHttpsConnector>;

/// Why the adapter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SlackSetupError {
    #[error("slack.bot_token: {0}")]
    Token(#[from] SecretError),
    #[error("cannot load the system's TLS roots: {0}")]
    Tls(std::io::Error),
    #[error("Slack Socket Mode: {0}")]
    SocketMode(String),
}

/// Talks to Slack's Web API; implements [`Notifier`].
pub struct SlackAdapter {
    client: Arc<Client>,
    token: SlackApiToken,
    config: SlackConfig,
    /// Directory mail → Slack user id found by `users.lookupByEmail`, and
    /// when: kept for [`LOOKUP_TTL`], and dropped as soon as Slack refuses
    /// the id (a replaced or deactivated account).
    by_mail: Mutex<HashMap<String, (String, std::time::Instant)>>,
}

/// How long a `users.lookupByEmail` answer is reused.
const LOOKUP_TTL: Duration = Duration::from_secs(3600);

/// Slack's `error` codes that report a hiccup on Slack's side rather than a
/// "no" about the call: worth a retry (Slack's method docs: "likely due to a
/// transient issue on our end").
const TRANSIENT: &[&str] = &[
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
];

/// `conversations.open` refusals that say the user id itself is no good
/// (the account was deactivated, replaced or is a bot): the cached lookup
/// of their mail is dropped and asked again.
const STALE_USER: &[&str] = &[
    "user_not_found",
    "user_disabled",
    "account_inactive",
    "cannot_dm_bot",
    "user_not_visible",
];

/// A Slack user found by mail, or why they cannot get a DM.
enum Lookup {
    /// Their id, and whether it came from the cache.
    Found(String, bool),
    Unusable(String),
}

impl SlackAdapter {
    /// Builds the adapter from config, resolving the bot token.
    pub fn new(config: &SlackConfig) -> Result<SlackAdapter, SlackSetupError> {
        let token = config.bot_token.resolve()?;
        SlackAdapter::with_token(config, token)
    }

    /// Builds the adapter with an already-resolved bot token.
    pub fn with_token(config: &SlackConfig, bot_token: Secret) -> Result<SlackAdapter, SlackSetupError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(SlackSetupError::Tls)?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        // slack-morphism appends `/{method}` itself.
        let api_url = config.api_url.trim_end_matches('/');
        let connector = SlackClientHyperConnector::with_connector(https).with_slack_api_url(api_url);
        Ok(SlackAdapter {
            client: Arc::new(SlackClient::new(connector)),
            token: SlackApiToken::new(bot_token.expose().to_string().into()),
            config: config.clone(),
            by_mail: Mutex::default(),
        })
    }

    pub fn config(&self) -> &SlackConfig {
        &self.config
    }

    pub(crate) fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    fn session(&self) -> SlackClientSession<'_, SlackClientHyperHttpsConnector> {
        self.client.open_session(&self.token)
    }

    fn channel_for(&self, audience: &Audience) -> Option<String> {
        match audience {
            Audience::Group(g) => Some(
                self.config
                    .channels
                    .get(g.as_str())
                    .unwrap_or(&self.config.default_channel)
                    .clone(),
            ),
            Audience::Alert => Some(
                self.config
                    .alert_channel
                    .clone()
                    .unwrap_or_else(|| self.config.default_channel.clone()),
            ),
            Audience::User { .. } => None,
        }
    }

    /// Posts a message; returns its channel and `ts`.
    async fn post(&self, channel: &str, content: SlackMessageContent) -> Result<(String, String), ChatError> {
        let req = SlackApiChatPostMessageRequest::new(channel.to_string().into(), content);
        let res = self.session().chat_post_message(&req).await.map_err(chat_error)?;
        Ok((res.channel.to_string(), res.ts.to_string()))
    }

    /// Opens (or finds) the DM channel with a Slack user. A 429 is returned
    /// at once as [`ChatError::RateLimited`], never slept on here: the
    /// outbox retries after its `Retry-After`, and other deliveries (alerts)
    /// go on meanwhile.
    pub(crate) async fn dm_channel(&self, slack_user: &str) -> Result<String, ChatError> {
        let req = SlackApiConversationsOpenRequest::new().with_users(vec![slack_user.to_string().into()]);
        let res = self
            .session()
            .conversations_open(&req)
            .await
            .map_err(chat_error)?;
        Ok(res.channel.id.to_string())
    }

    /// Sends `text` by DM to a Slack user.
    pub(crate) async fn dm(&self, slack_user: &str, content: SlackMessageContent) -> Result<(), ChatError> {
        let channel = self.dm_channel(slack_user).await?;
        self.post(&channel, content).await.map(|_| ())
    }

    /// An ephemeral message only `slack_user` sees in `channel`.
    pub(crate) async fn ephemeral(
        &self,
        channel: &str,
        slack_user: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        let req = SlackApiChatPostEphemeralRequest::new(
            channel.to_string().into(),
            slack_user.to_string().into(),
            SlackMessageContent::new().with_text(blocks::escape(text)),
        );
        self.session()
            .chat_post_ephemeral(&req)
            .await
            .map_err(chat_error)?;
        Ok(())
    }

    /// The email on a Slack user's profile (`users.info`, scope `users:read.email`).
    pub(crate) async fn email_of(&self, slack_user: &str) -> Result<Option<String>, ChatError> {
        let req = SlackApiUsersInfoRequest::new(slack_user.to_string().into());
        let res = self.session().users_info(&req).await.map_err(chat_error)?;
        Ok(res.user.profile.and_then(|p| p.email).map(|e| e.to_string()))
    }

    /// The Slack user whose profile has `mail` (`users.lookupByEmail`, scope
    /// `users:read.email`), or `None`. Found ids are cached for the life of
    /// the process; a 429 is returned at once (the outbox retries after it).
    async fn user_by_mail(&self, mail: &str) -> Result<Lookup, ChatError> {
        let cached = self
            .by_mail
            .lock()
            .ok()
            .and_then(|m| m.get(mail).cloned())
            .filter(|(_, at)| at.elapsed() < LOOKUP_TTL);
        if let Some((id, _)) = cached {
            return Ok(Lookup::Found(id, true));
        }
        let req = SlackApiUsersLookupByEmailRequest::new(mail.to_string().into());
        let user = match self.session().users_lookup_by_email(&req).await {
            Ok(res) => res.user,
            Err(SlackClientError::ApiError(api)) if api.code == "users_not_found" => {
                return Ok(Lookup::Unusable(format!(
                    "no Slack user has the email {mail} (users.lookupByEmail)"
                )))
            }
            Err(e) => return Err(chat_error(e)),
        };
        let id = user.id.to_string();
        // jitbot refuses clicks from users of another workspace, and
        // neither a deactivated account nor a bot can act on a card.
        let team = user.team_id.as_ref().map(|t| t.to_string());
        let unusable = match team {
            Some(team) if team != self.config.team_id => Some(format!(
                "the Slack user {id} with the email {mail} belongs to workspace {team}, not to {} (slack.team_id), whose clicks jitbot refuses",
                self.config.team_id
            )),
            _ if user.deleted == Some(true) => Some(format!(
                "the Slack user {id} with the email {mail} is deactivated"
            )),
            _ if user.flags.is_bot == Some(true) => Some(format!(
                "the Slack user {id} with the email {mail} is a bot"
            )),
            _ => None,
        };
        if let Some(why) = unusable {
            return Ok(Lookup::Unusable(why));
        }
        if let Ok(mut m) = self.by_mail.lock() {
            m.insert(mail.to_string(), (id.clone(), std::time::Instant::now()));
        }
        Ok(Lookup::Found(id, false))
    }

    /// Drops the cached lookup of `mail`.
    fn forget_mail(&self, mail: &str) {
        if let Ok(mut m) = self.by_mail.lock() {
            m.remove(mail);
        }
    }

    /// The Slack user for a directory person: by the mail attribute
    /// (`slack.user_attribute`). The error says why there is none, or that
    /// the lookup failed for now (a rate limit, an outage).
    async fn slack_user(&self, contact: &Contact) -> Result<String, DmError> {
        self.slack_user_by_mail(contact).await.map(|(id, _, _)| id)
    }

    /// [`Self::slack_user`] with the mail it was found by and whether the
    /// answer came from the cache.
    async fn slack_user_by_mail(&self, contact: &Contact) -> Result<(String, String, bool), DmError> {
        let attr = &self.config.user_attribute;
        let mail = contact.attributes.get(attr).ok_or_else(|| {
            DmError::Unreachable(format!("the directory has no {attr} for {}", contact.user))
        })?;
        match self.user_by_mail(mail).await {
            Ok(Lookup::Found(id, cached)) => Ok((id, mail.clone(), cached)),
            Ok(Lookup::Unusable(why)) => Err(DmError::Unreachable(why)),
            Err(ChatError::Refused(why)) => Err(DmError::Unreachable(format!(
                "users.lookupByEmail refused: {why}"
            ))),
            Err(e) => Err(DmError::Failed(e)),
        }
    }

    /// Opens a modal; `trigger_id` is valid for 3 seconds after the click.
    pub(crate) async fn open_view(&self, trigger_id: &str, view: SlackView) -> Result<(), ChatError> {
        let req = SlackApiViewsOpenRequest::new(trigger_id.to_string().into(), view);
        self.session().views_open(&req).await.map_err(chat_error)?;
        Ok(())
    }

    /// Answers through a `response_url` (ephemeral, at most 5 uses in 30
    /// minutes). The bot token is not sent there: the URL itself is the
    /// credential. Retries a rate limit or a transient failure twice.
    pub(crate) async fn respond(&self, response_url: &str, text: &str) -> Result<(), ChatError> {
        let url: url::Url = response_url
            .parse()
            .map_err(|_| ChatError::Refused("response_url is not a URL".into()))?;
        let body = serde_json::json!({ "response_type": "ephemeral", "text": blocks::escape(text) });
        let span = tracing::debug_span!("slack response_url");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let context = SlackClientApiCallContext {
                rate_control_params: None,
                token: None,
                tracing_span: &span,
                is_sensitive_url: true,
            };
            let sent: Result<serde_json::Value, _> = self
                .client
                .http_api
                .connector
                .http_post_uri(url.clone(), &body, context)
                .await;
            match sent.map_err(chat_error) {
                Ok(_) => return Ok(()),
                Err(ChatError::RateLimited(secs)) if attempt < 3 => {
                    tokio::time::sleep(Duration::from_secs(secs.clamp(1, 10))).await
                }
                Err(ChatError::Unavailable(_)) if attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Maps slack-morphism's errors to the port's, and counts them.
fn chat_error(e: SlackClientError) -> ChatError {
    crate::metrics::chat_error(PLATFORM);
    let mapped = match &e {
        SlackClientError::RateLimitError(r) => {
            ChatError::RateLimited(r.retry_after.map(|d| d.as_secs().max(1)).unwrap_or(1))
        }
        SlackClientError::ApiError(api) if api.code == "ratelimited" => ChatError::RateLimited(1),
        SlackClientError::ApiError(api) if TRANSIENT.contains(&api.code.as_str()) => {
            ChatError::Unavailable(format!("Slack answered {}", api.code))
        }
        SlackClientError::ApiError(api) => ChatError::Refused(api.code.clone()),
        SlackClientError::HttpError(h) if h.status_code.is_server_error() => {
            ChatError::Unavailable(format!("HTTP {}", h.status_code))
        }
        SlackClientError::HttpError(h) => ChatError::Refused(format!("HTTP {}", h.status_code)),
        other => ChatError::Unavailable(first_line(&other.to_string())),
    };
    tracing::warn!(error = %mapped, "Slack API call failed");
    mapped
}

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

#[async_trait]
impl Notifier for SlackAdapter {
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        let copies = cards::Collected::default();
        cards::post(PLATFORM, self, card, &[], &copies)
            .await
            .map_err(|e| e.error)?;
        Ok(copies.into_copies())
    }

    async fn post_missing_copies(
        &self,
        card: &ApprovalCard,
        posted: &[MessageRef],
        log: &dyn CopyLog,
    ) -> Result<(), PostError> {
        cards::post(PLATFORM, self, card, posted, log).await
    }

    async fn update_approval(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
        if at.platform != PLATFORM {
            return Ok(());
        }
        self.rewrite(at, &cards::for_copy(at, card)).await
    }

    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        let content = blocks::notice(notice);
        match &notice.to {
            Audience::User { chat: Some(chat), .. } if chat.platform == PLATFORM => {
                self.dm(&chat.user, content).await
            }
            Audience::User { user, .. } => {
                // Never talked to jitbot on Slack: nowhere to reach them here.
                tracing::debug!(%user, "no Slack identity for this person; notice not sent on Slack");
                Ok(())
            }
            audience => {
                let channel = self
                    .channel_for(audience)
                    .unwrap_or_else(|| self.config.default_channel.clone());
                self.post(&channel, content).await.map(|_| ())
            }
        }
    }

    /// By DM: where they talked to jitbot on Slack, else the Slack user
    /// with their directory mail. Someone Slack does not know is skipped.
    async fn send_to(&self, notice: &Notice, contact: &Contact) -> Result<(), ChatError> {
        if let Audience::User { chat: Some(chat), .. } = &notice.to {
            if chat.platform == PLATFORM {
                return self.send(notice).await;
            }
        }
        if !matches!(notice.to, Audience::User { .. }) {
            return self.send(notice).await;
        }
        match self.slack_user(contact).await {
            Ok(slack_user) => self.dm(&slack_user, blocks::notice(notice)).await,
            Err(DmError::Unreachable(why)) => {
                tracing::debug!(user = %contact.user, reason = %why, "notice not sent on Slack");
                Ok(())
            }
            Err(DmError::Failed(e)) => Err(e),
        }
    }

    fn contact_attributes(&self) -> Vec<String> {
        vec![self.config.user_attribute.clone()]
    }

    async fn ready(&self) -> Result<(), ChatError> {
        self.session().auth_test().await.map(|_| ()).map_err(|e| {
            crate::metrics::chat_error(PLATFORM);
            ChatError::Unavailable(format!("auth.test failed: {e}"))
        })
    }
}

#[async_trait]
impl CardCopies for SlackAdapter {
    async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
        let channel = self
            .channel_for(&Audience::Group(card.group.clone()))
            .unwrap_or_else(|| self.config.default_channel.clone());
        let (channel, ts) = self.post(&channel, blocks::approval_card(card)).await?;
        Ok(MessageRef {
            platform: PLATFORM.into(),
            channel,
            id: ts,
            copy: Default::default(),
            shows: None,
        })
    }

    async fn rewrite(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
        let req = SlackApiChatUpdateRequest::new(
            at.channel.clone().into(),
            blocks::approval_card(card),
            at.id.clone().into(),
        );
        self.session().chat_update(&req).await.map_err(chat_error)?;
        Ok(())
    }

    async fn open_dm(&self, to: &Contact) -> Result<String, DmError> {
        let (mut slack_user, mail, mut cached) = self.slack_user_by_mail(to).await?;
        loop {
            match self.dm_channel(&slack_user).await {
                Ok(channel) => return Ok(channel),
                Err(ChatError::Refused(why)) if STALE_USER.contains(&why.as_str()) => {
                    // The account behind the id is gone or replaced: ask
                    // Slack again next time, and now if the id was cached.
                    self.forget_mail(&mail);
                    if !cached {
                        return Err(DmError::Unreachable(format!(
                            "conversations.open refused Slack user {slack_user}: {why}"
                        )));
                    }
                    tracing::info!(user = %to.user, slack_user = %slack_user, reason = %why, "Slack refused a cached user id; looking the mail up again");
                    (slack_user, _, cached) = self.slack_user_by_mail(to).await?;
                }
                Err(ChatError::Refused(why)) => {
                    return Err(DmError::Unreachable(format!("conversations.open refused: {why}")))
                }
                Err(e) => return Err(DmError::Failed(e)),
            }
        }
    }

    async fn post_in_dm(&self, dm: &str, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
        let (channel, ts) = self.post(dm, blocks::approval_card(card)).await?;
        Ok(MessageRef {
            platform: PLATFORM.into(),
            channel,
            id: ts,
            copy: Default::default(),
            shows: None,
        })
    }
}
