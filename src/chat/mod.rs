//! Chat adapters and the platform-neutral message model they render.

pub mod discord;
pub mod fanout;
pub mod outbox;
pub mod render;
pub mod slack;
pub mod view;
pub mod web;

use crate::clock::Clock;
use crate::config::Config;
use crate::engine::Engine;
use crate::ports::Notifier;
use axum::Router;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;

/// A background task of an adapter (Socket Mode, a gateway), given the
/// shutdown signal.
pub type AdapterTask = Box<dyn FnOnce(watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What the configured chat adapters add to a running jitbot.
#[derive(Default)]
pub struct Adapters {
    pub routers: Vec<Router>,
    pub tasks: Vec<AdapterTask>,
}

/// Builds the chat adapters the config names, registering their notifiers.
pub fn configure(
    config: &Config,
    engine: &Engine,
    clock: Arc<dyn Clock>,
    platforms: &mut Vec<(String, Arc<dyn Notifier>)>,
) -> anyhow::Result<Adapters> {
    let adapters = Adapters::default();
    let _ = (config, engine, clock, platforms);
    Ok(adapters)
}
