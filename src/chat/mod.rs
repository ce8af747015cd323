//! Chat adapters and the platform-neutral message model they render.

pub mod cards;
pub mod discord;
pub mod fanout;
pub mod inbound;
pub mod outbox;
pub mod render;
pub mod slack;
pub mod view;
pub mod web;
pub mod work;

use crate::clock::Clock;
use crate::config::{Config, SlackMode};
use crate::engine::Engine;
use crate::ports::Notifier;
use anyhow::Context;
use axum::Router;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;

/// A background task of an adapter that may run on every replica (Socket
/// Mode), given the shutdown signal.
pub type AdapterTask =
    Box<dyn FnOnce(watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A background task of an adapter that only the leader runs (the Discord
/// gateway connection, HTTP mode's command registration): started each
/// time this replica takes a term, given a signal that turns true when the
/// term or the process ends. Alone (sled), it runs once, until shutdown.
pub type LeaderTask =
    Arc<dyn Fn(watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the configured chat adapters add to a running jitbot.
#[derive(Default)]
pub struct Adapters {
    /// Routes for the public listener (chat endpoints).
    pub routers: Vec<Router>,
    /// Routes for the admin listener (the dashboard).
    pub admin_routers: Vec<Router>,
    /// Tasks every replica runs until shutdown (Socket Mode).
    pub tasks: Vec<AdapterTask>,
    /// Tasks only the leader runs, with its term (`app::start`'s work).
    pub leader_tasks: Vec<LeaderTask>,
}

/// Builds the chat adapters the config names, registering their notifiers.
pub fn configure(
    config: &Config,
    engine: &Engine,
    clock: Arc<dyn Clock>,
    platforms: &mut Vec<(String, Arc<dyn Notifier>)>,
) -> anyhow::Result<Adapters> {
    let mut adapters = Adapters::default();
    if let Some(cfg) = &config.slack {
        let adapter = Arc::new(slack::SlackAdapter::new(cfg).context("slack")?);
        platforms.push(("slack".into(), adapter.clone()));
        match cfg.mode {
            SlackMode::Http => {
                let secret = cfg
                    .signing_secret
                    .as_ref()
                    .context("slack.signing_secret: HTTP mode needs it")?
                    .resolve()
                    .context("slack.signing_secret")?;
                adapters
                    .routers
                    .push(slack::routes(engine.clone(), adapter, secret, clock.clone()));
            }
            SlackMode::Socket => {
                let token = cfg
                    .app_token
                    .as_ref()
                    .context("slack.app_token: Socket Mode needs it")?
                    .resolve()
                    .context("slack.app_token")?;
                let engine = engine.clone();
                adapters.tasks.push(Box::new(move |shutdown| {
                    Box::pin(async move {
                        if let Err(e) = slack::run_socket_mode(engine, adapter, token, shutdown).await {
                            tracing::error!(error = %e, "Slack Socket Mode stopped");
                        }
                    })
                }));
            }
        }
    }
    if let Some(cfg) = &config.discord {
        let (adapter, router, task) = discord::configure(cfg, engine, clock.clone())?;
        platforms.push(("discord".into(), adapter));
        adapters.routers.extend(router);
        adapters.leader_tasks.extend(task);
    }
    if config.server.dashboard {
        let token = config
            .server
            .admin_token
            .as_ref()
            .context("server.dashboard needs server.admin_token")?
            .resolve_admin_token()
            .context("server.admin_token")?;
        adapters.admin_routers.push(web::dashboard_routes(
            engine.clone(),
            web::DashboardAccess::Token(token),
        ));
    }
    Ok(adapters)
}
