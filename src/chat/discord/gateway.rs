//! Gateway mode: a serenity `Client` whose only event handler turns each
//! interaction into the shared [`Incoming`] and answers with what
//! [`DiscordHandler::handle`] returns. It needs a live Discord connection,
//! so the tests cover the shared handling through the HTTP endpoint and
//! this file only compiles here; registration runs in both modes.

use super::handle::DiscordHandler;
use super::interaction::Incoming;
use super::DiscordAdapter;
use crate::chat::AdapterTask;
use crate::secret::Secret;
use async_trait::async_trait;
use serenity::all::{Client, Context, EventHandler, GatewayIntents, Interaction, InteractionId, Ready};
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
            Ok(outcome) => {
                let sent = ctx
                    .http
                    .create_interaction_response(id, &token, &outcome.response, vec![])
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "cannot answer a Discord interaction");
                }
                if let Some(later) = outcome.later {
                    tokio::spawn(later);
                }
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

/// HTTP mode's start-up task: register `/jit`, then nothing more.
pub fn register_task(adapter: Arc<DiscordAdapter>) -> AdapterTask {
    Box::new(move |mut shutdown| {
        Box::pin(async move {
            tokio::select! {
                _ = register(&adapter) => {}
                _ = stopped(&mut shutdown) => {}
            }
        })
    })
}

/// Gateway mode's task: register `/jit`, then hold the gateway connection
/// (serenity reconnects by itself) until shutdown. Interactions need no
/// privileged intents.
pub fn task(token: Secret, handler: Arc<DiscordHandler>, adapter: Arc<DiscordAdapter>) -> AdapterTask {
    Box::new(move |mut shutdown| {
        Box::pin(async move {
            tokio::select! {
                _ = register(&adapter) => {}
                _ = stopped(&mut shutdown) => return,
            }
            let built = Client::builder(token.expose(), GatewayIntents::empty())
                .event_handler(Gateway { handler })
                .await;
            let mut client = match built {
                Ok(client) => client,
                Err(e) => return tracing::error!(error = %e, "cannot start the Discord gateway client"),
            };
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
