//! The Discord adapter (serenity 0.12): approval cards with buttons and
//! notices out through the REST API with the bot token; `/jit`, clicks and
//! modals in through the gateway (default) or the HTTP interactions
//! endpoint. Both modes hand their interactions to one [`DiscordHandler`].

mod command;
mod endpoint;
mod gateway;
mod handle;
mod interaction;
pub mod message;

pub use endpoint::{routes, BODY_LIMIT, MAX_SKEW_SECS};
pub use handle::{DiscordHandler, Outcome};
pub use interaction::{Incoming, Rejected};

use crate::chat::cards::{self, CardCopies, DmError};
use crate::chat::render;
use crate::clock::Clock;
use crate::config::{DiscordConfig, DiscordMode, DISCORD_API};
use crate::engine::Engine;
use crate::ports::{
    ApprovalCard, Audience, ChatError, Contact, CopyLog, MessageRef, Notice, Notifier, PostError,
};
use crate::secret::{Secret, SecretError};
use async_trait::async_trait;
use serenity::all::{
    ApplicationId, ChannelId, CreateAllowedMentions, EditInteractionResponse, GuildId, HttpError, MessageId,
    UserId as DiscordUserId,
};
use serenity::http::{Http, HttpBuilder};
use std::sync::Arc;
use std::time::Duration;

/// The platform name in [`MessageRef`] and [`crate::ports::ChatRef`].
pub const PLATFORM: &str = "discord";

/// How long an interaction's work may run before its answer is deferred.
/// Discord allows 3 seconds for the first response, network included.
pub const DEFAULT_ANSWER_BUDGET: Duration = Duration::from_millis(2000);

/// Why the adapter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DiscordSetupError {
    #[error("discord.bot_token: {0}")]
    Token(#[from] SecretError),
    #[error("discord.{0}: `{1}` is not a Discord id (a non-zero number)")]
    BadId(&'static str, String),
}

/// Talks to Discord's REST API; implements [`Notifier`].
pub struct DiscordAdapter {
    http: Arc<Http>,
    app: ApplicationId,
    config: DiscordConfig,
    answer_budget: Duration,
}

/// A Discord id (snowflake) from text; serenity's ids must not be zero.
fn snowflake(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().filter(|id| *id != 0)
}

fn channel_id(text: &str) -> Result<ChannelId, ChatError> {
    snowflake(text)
        .map(ChannelId::new)
        .ok_or_else(|| ChatError::Refused(format!("`{text}` is not a Discord channel id")))
}

impl DiscordAdapter {
    /// Builds the adapter from config, resolving the bot token.
    pub fn new(config: &DiscordConfig) -> Result<DiscordAdapter, DiscordSetupError> {
        let token = config.bot_token.resolve()?;
        DiscordAdapter::with_token(config, token)
    }

    /// Builds the adapter with an already-resolved bot token.
    ///
    /// REST calls go to `discord.api_url`. Any base but Discord's own is a
    /// proxy (a shared rate-limiting proxy, or a test server): serenity then
    /// leaves rate limiting to it, because it ignores a proxy while its own
    /// rate limiter is on.
    pub fn with_token(
        config: &DiscordConfig,
        bot_token: Secret,
    ) -> Result<DiscordAdapter, DiscordSetupError> {
        let app = snowflake(&config.application_id)
            .ok_or_else(|| DiscordSetupError::BadId("application_id", config.application_id.clone()))?;
        let mut ids = vec![("default_channel", &config.default_channel)];
        ids.extend(config.alert_channel.iter().map(|c| ("alert_channel", c)));
        ids.extend(config.channels.values().map(|c| ("channels", c)));
        ids.extend(config.guild_id.iter().map(|g| ("guild_id", g)));
        if let Some((key, bad)) = ids.into_iter().find(|(_, v)| snowflake(v).is_none()) {
            return Err(DiscordSetupError::BadId(key, bad.clone()));
        }
        let app = ApplicationId::new(app);
        Ok(DiscordAdapter {
            http: Arc::new(http_client(config, &bot_token, app)),
            app,
            config: config.clone(),
            answer_budget: DEFAULT_ANSWER_BUDGET,
        })
    }

    /// Changes how long work may run before an answer is deferred.
    pub fn with_answer_budget(mut self, budget: Duration) -> Self {
        self.answer_budget = budget;
        self
    }

    pub fn config(&self) -> &DiscordConfig {
        &self.config
    }

    pub(crate) fn answer_budget(&self) -> Duration {
        self.answer_budget
    }

    /// A second REST client like the adapter's, for the gateway client
    /// (serenity's `ClientBuilder` takes one by value).
    pub(crate) fn gateway_http(&self, bot_token: &Secret) -> Http {
        http_client(&self.config, bot_token, self.app)
    }

    /// `GET /gateway/bot` at `discord.api_url`: where the gateway is, and how
    /// many session starts are left today.
    pub(crate) async fn bot_gateway(&self) -> Result<serenity::all::BotGateway, ChatError> {
        self.http.get_bot_gateway().await.map_err(chat_error)
    }

    /// Registers `/jit` in the configured guild, or globally. A bulk
    /// overwrite: registering the same definition again changes nothing.
    pub async fn register_commands(&self) -> Result<(), ChatError> {
        let commands = vec![command::definition()];
        let done = match self.config.guild_id.as_deref().and_then(snowflake) {
            Some(guild) => GuildId::new(guild).set_commands(&*self.http, commands).await,
            None => serenity::all::Command::set_global_commands(&*self.http, commands).await,
        };
        done.map(|_| ()).map_err(chat_error)
    }

    fn channel_for(&self, audience: &Audience) -> String {
        let c = &self.config;
        match audience {
            Audience::Group(g) => c.channels.get(g.as_str()).unwrap_or(&c.default_channel).clone(),
            Audience::Alert => c
                .alert_channel
                .clone()
                .unwrap_or_else(|| c.default_channel.clone()),
            Audience::User { .. } => c.default_channel.clone(),
        }
    }

    /// Replaces a deferred answer (the interaction token lasts 15 minutes).
    /// Tried twice: Discord may not have taken the deferral when the work
    /// finishes just after it was sent.
    pub(crate) async fn edit_original(&self, token: &str, text: &str) -> Result<(), ChatError> {
        let edit = EditInteractionResponse::new()
            .content(render::clip(text, message::CONTENT_LIMIT))
            .allowed_mentions(CreateAllowedMentions::new());
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .http
                .edit_original_interaction_response(token, &edit, vec![])
                .await
            {
                Ok(_) => return Ok(()),
                Err(_) if attempt < 2 => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(e) => return Err(chat_error(e)),
            }
        }
    }

    async fn dm(&self, discord_user: &str, notice: &Notice) -> Result<(), ChatError> {
        let dm = self.dm_channel(discord_user).await?;
        dm.send_message(&*self.http, message::notice_message(notice))
            .await
            .map_err(chat_error)?;
        Ok(())
    }

    /// The DM channel with a Discord user (`POST /users/@me/channels`); a
    /// 429 is returned at once (the outbox retries after the pause).
    async fn dm_channel(&self, discord_user: &str) -> Result<ChannelId, ChatError> {
        let user = snowflake(discord_user)
            .map(DiscordUserId::new)
            .ok_or_else(|| ChatError::Refused(format!("`{discord_user}` is not a Discord user id")))?;
        let dm = user.create_dm_channel(&*self.http).await.map_err(chat_error)?;
        Ok(dm.id)
    }

    /// The Discord user for a directory person: the entry of `discord.users`
    /// that maps to them, else their `discord.user_attribute`. The error
    /// says why there is none.
    fn discord_user(&self, contact: &Contact) -> Result<String, String> {
        let c = &self.config;
        let mapped = c
            .users
            .iter()
            .find(|(_, dir)| dir.eq_ignore_ascii_case(contact.user.as_str()))
            .map(|(discord, _)| discord.clone());
        if let Some(id) = mapped {
            return Ok(id);
        }
        match &c.user_attribute {
            Some(attr) => contact
                .attributes
                .get(attr)
                .cloned()
                .ok_or_else(|| format!("the directory has no {attr} for {}", contact.user)),
            None => Err(format!(
                "{} is not in discord.users and discord.user_attribute is not set",
                contact.user
            )),
        }
    }
}

/// A serenity REST client for `discord.api_url`. Any base but Discord's own
/// is a proxy: serenity ignores a proxy unless its rate limiter is off, and a
/// shared proxy does the rate limiting in its place.
fn http_client(config: &DiscordConfig, bot_token: &Secret, app: ApplicationId) -> Http {
    let mut builder = HttpBuilder::new(bot_token.expose()).application_id(app);
    let base = config.api_url.trim_end_matches('/');
    if base != DISCORD_API {
        builder = builder.proxy(base).ratelimiter_disabled(true);
    }
    builder.build()
}

/// Maps serenity's errors to the port's, and counts them. Tokens never
/// appear in serenity's error texts, only status, URL path and Discord's code.
fn chat_error(e: serenity::Error) -> ChatError {
    crate::metrics::chat_error(PLATFORM);
    let mapped = match &e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) if r.status_code.as_u16() == 429 => {
            // With the rate limiter on, serenity waits out 429s itself; one
            // reaching here means a shared or global limit: back off a little.
            ChatError::RateLimited(1)
        }
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) if r.status_code.is_server_error() => {
            ChatError::Unavailable(format!("HTTP {}", r.status_code))
        }
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => ChatError::Refused(format!(
            "HTTP {} (Discord code {}: {})",
            r.status_code, r.error.code, r.error.message
        )),
        serenity::Error::Http(HttpError::Request(_)) => ChatError::Unavailable("cannot reach Discord".into()),
        other => ChatError::Unavailable(other.to_string().chars().take(200).collect()),
    };
    tracing::warn!(error = %mapped, "Discord API call failed");
    mapped
}

#[async_trait]
impl Notifier for DiscordAdapter {
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
        match &notice.to {
            Audience::User { chat: Some(chat), .. } if chat.platform == PLATFORM => {
                self.dm(&chat.user, notice).await
            }
            Audience::User { user, .. } => {
                // Never talked to jitbot on Discord: nowhere to reach them here.
                tracing::debug!(%user, "no Discord identity for this person; notice not sent on Discord");
                Ok(())
            }
            audience => {
                let channel = channel_id(&self.channel_for(audience))?;
                channel
                    .send_message(&*self.http, message::notice_message(notice))
                    .await
                    .map_err(chat_error)?;
                Ok(())
            }
        }
    }

    /// By DM: where they talked to jitbot on Discord, else the Discord user
    /// `discord.users` or `discord.user_attribute` names. Someone with
    /// neither is skipped.
    async fn send_to(&self, notice: &Notice, contact: &Contact) -> Result<(), ChatError> {
        if let Audience::User { chat: Some(chat), .. } = &notice.to {
            if chat.platform == PLATFORM {
                return self.send(notice).await;
            }
        }
        if !matches!(notice.to, Audience::User { .. }) {
            return self.send(notice).await;
        }
        match self.discord_user(contact) {
            Ok(discord_user) => self.dm(&discord_user, notice).await,
            Err(why) => {
                tracing::debug!(user = %contact.user, reason = %why, "notice not sent on Discord");
                Ok(())
            }
        }
    }

    fn contact_attributes(&self) -> Vec<String> {
        self.config.user_attribute.iter().cloned().collect()
    }

    async fn ready(&self) -> Result<(), ChatError> {
        self.http
            .get_current_user()
            .await
            .map(|_| ())
            .map_err(|e| ChatError::Unavailable(format!("cannot read the bot user: {e}")))
    }
}

#[async_trait]
impl CardCopies for DiscordAdapter {
    async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
        let channel = channel_id(&self.channel_for(&Audience::Group(card.group.clone())))?;
        self.post_card_in(channel, card).await
    }

    async fn rewrite(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
        let message = snowflake(&at.id)
            .map(MessageId::new)
            .ok_or_else(|| ChatError::Refused(format!("`{}` is not a Discord message id", at.id)))?;
        // The bot token, not the interaction's: cards are edited long after
        // the 15 minutes an interaction token lasts.
        channel_id(&at.channel)?
            .edit_message(&*self.http, message, message::approval_edit(card))
            .await
            .map_err(chat_error)?;
        Ok(())
    }

    async fn open_dm(&self, to: &Contact) -> Result<String, DmError> {
        let discord_user = self.discord_user(to).map_err(DmError::Unreachable)?;
        match self.dm_channel(&discord_user).await {
            Ok(channel) => Ok(channel.to_string()),
            Err(ChatError::Refused(why)) => Err(DmError::Unreachable(format!(
                "cannot open a DM with Discord user {discord_user}: {why}"
            ))),
            Err(e) => Err(DmError::Failed(e)),
        }
    }

    async fn post_in_dm(&self, dm: &str, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
        self.post_card_in(channel_id(dm)?, card).await
    }
}

impl DiscordAdapter {
    async fn post_card_in(&self, channel: ChannelId, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
        let posted = channel
            .send_message(&*self.http, message::approval_message(card))
            .await
            .map_err(chat_error)?;
        Ok(MessageRef {
            platform: PLATFORM.into(),
            channel: posted.channel_id.to_string(),
            id: posted.id.to_string(),
            copy: Default::default(),
            shows: None,
        })
    }
}

/// Builds the Discord adapter from config: the notifier, the interactions
/// endpoint in HTTP mode, and a leader task that registers `/jit` (and, in
/// gateway mode, then runs the gateway connection until the term ends).
pub fn configure(
    config: &DiscordConfig,
    engine: &Engine,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<(
    Arc<DiscordAdapter>,
    Option<axum::Router>,
    Option<crate::chat::LeaderTask>,
)> {
    let token = config.bot_token.resolve().map_err(DiscordSetupError::from)?;
    let adapter = Arc::new(DiscordAdapter::with_token(config, token.clone())?);
    match config.mode {
        DiscordMode::Http => {
            let key = config.public_key.as_deref().ok_or_else(|| {
                anyhow::anyhow!("discord.public_key: HTTP mode needs the application's public key")
            })?;
            let router = routes(engine.clone(), adapter.clone(), key, clock)?;
            Ok((
                adapter.clone(),
                Some(router),
                Some(gateway::register_task(adapter)),
            ))
        }
        DiscordMode::Gateway => {
            let handler = DiscordHandler::new(engine.clone(), adapter.clone());
            Ok((
                adapter.clone(),
                None,
                Some(gateway::task(token, handler, adapter)),
            ))
        }
    }
}
