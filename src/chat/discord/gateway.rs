//! Gateway mode: a serenity `Client` whose only event handler turns each
//! interaction into the shared [`Incoming`] and answers with what
//! [`DiscordHandler::handle`] returns. The gateway URL comes from
//! `GET /gateway/bot` at `discord.api_url`; `tests/it/gateway.rs` runs it
//! against a gateway v10 fake. Registration runs in both modes. Both are
//! leader tasks: with replicas only the leader holds a gateway session.

use super::handle::DiscordHandler;
use super::interaction::{Incoming, Rejected};
use super::DiscordAdapter;
use crate::chat::LeaderTask;
use crate::secret::Secret;
use async_trait::async_trait;
use serenity::all::{
    ClientBuilder, Context, EventHandler, GatewayIntents, Interaction, InteractionId, Ready,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

struct Gateway {
    handler: Arc<DiscordHandler>,
}

#[async_trait]
impl EventHandler for Gateway {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        tracing::info!(bot = %ready.user.name, guilds = ready.guilds.len(), "connected to the Discord gateway");
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        let incoming = match Incoming::from_serenity(&interaction) {
            Ok(incoming) => incoming,
            Err(e) => return tracing::warn!(error = %e, "ignored a Discord interaction"),
        };
        let token = match &incoming {
            Incoming::Command(i) | Incoming::Autocomplete(i) => i.origin.token.clone(),
            Incoming::Button { origin, .. } | Incoming::Modal { origin, .. } => origin.token.clone(),
            Incoming::Ping => return,
        };
        let id: InteractionId = interaction.id();
        match self.handler.handle(incoming).await {
            Ok(mut outcome) => {
                let sent = ctx
                    .http
                    .create_interaction_response(id, &token, &outcome.response, vec![])
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "cannot answer a Discord interaction");
                }
                if let Some(later) = outcome.later.take() {
                    crate::chat::work::spawn(later);
                }
                // Only now may a replay of this interaction be told it was handled.
                drop(outcome);
            }
            Err(e @ Rejected::InFlight(_)) => {
                tracing::info!(error = %e, "ignored a replayed Discord interaction")
            }
            Err(e) => tracing::warn!(error = %e, "refused a Discord interaction"),
        }
    }
}

/// Registers `/jit`, retrying a few times; a failure is logged, not fatal:
/// the command registered at an earlier start keeps working.
async fn register(adapter: &DiscordAdapter) {
    for attempt in 1..=3u64 {
        match adapter.register_commands().await {
            Ok(()) => return tracing::info!("registered the /jit command on Discord"),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot register the /jit command");
                tokio::time::sleep(Duration::from_secs(2 * attempt)).await;
            }
        }
    }
    tracing::error!("gave up registering /jit on Discord; an earlier registration may still be in place");
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// HTTP mode's leader task: register `/jit`, then nothing more.
pub fn register_task(adapter: Arc<DiscordAdapter>) -> LeaderTask {
    Arc::new(move |mut shutdown| {
        let adapter = adapter.clone();
        Box::pin(async move {
            tokio::select! {
                _ = register(&adapter) => {}
                _ = stopped(&mut shutdown) => {}
            }
        })
    })
}

/// Asks `GET /gateway/bot` where the gateway is, retrying with capped
/// backoff (Discord down, a proxy not up yet) until it answers or shutdown.
async fn gateway_url(adapter: &DiscordAdapter, shutdown: &mut watch::Receiver<bool>) -> Option<String> {
    let mut attempt = 0;
    loop {
        match adapter.bot_gateway().await {
            Ok(gateway) => {
                let limit = &gateway.session_start_limit;
                tracing::info!(
                    url = %gateway.url,
                    sessions_left = limit.remaining,
                    sessions_per_day = limit.total,
                    "found the Discord gateway"
                );
                if limit.remaining == 0 {
                    tracing::warn!(
                        reset_after_ms = limit.reset_after,
                        "no Discord session starts left today: the gateway will refuse to identify \
                         until the limit resets; look for a jitbot restarting in a loop"
                    );
                }
                return Some(gateway.url);
            }
            Err(e) => {
                attempt += 1;
                let wait = Duration::from_secs((1u64 << attempt.min(6)).min(60));
                tracing::warn!(error = %e, retry_in = ?wait,
                    "cannot ask Discord for the gateway URL (GET /gateway/bot at discord.api_url); \
                     check the bot token and that discord.api_url is reachable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped(shutdown) => return None,
                }
            }
        }
    }
}

/// Gateway mode's leader task: register `/jit`, then hold the gateway
/// connection (serenity reconnects and resumes by itself) until the term or
/// the process ends.
/// Interactions arrive with no intent at all, so jitbot asks for none: no
/// guild, message or presence events reach it.
pub fn task(token: Secret, handler: Arc<DiscordHandler>, adapter: Arc<DiscordAdapter>) -> LeaderTask {
    Arc::new(move |mut shutdown| {
        let (token, handler, adapter) = (token.clone(), handler.clone(), adapter.clone());
        Box::pin(async move {
            tokio::select! {
                _ = register(&adapter) => {}
                _ = stopped(&mut shutdown) => return,
            }
            let Some(url) = gateway_url(&adapter, &mut shutdown).await else {
                return;
            };
            let built = ClientBuilder::new_with_http(adapter.gateway_http(&token), GatewayIntents::empty())
                .event_handler(Gateway { handler })
                .await;
            let mut client = match built {
                Ok(client) => client,
                Err(e) => return tracing::error!(error = %e, "cannot start the Discord gateway client"),
            };
            // serenity's builder asked `GET /gateway` (and falls back to
            // discord.gg when that fails); `/gateway/bot` is the bot's answer.
            *client.ws_url.lock().await = url;
            let shards = client.shard_manager.clone();
            tokio::select! {
                ended = client.start() => {
                    if let Err(e) = ended {
                        tracing::error!(error = %e, "the Discord gateway connection ended");
                    }
                }
                _ = stopped(&mut shutdown) => shards.shutdown_all().await,
            }
        })
    })
}
