//! Socket Mode: Slack pushes commands and clicks over a websocket opened
//! with the `xapp-` app-level token, so jitbot needs no public URL.
//!
//! The websocket URL comes from `apps.connections.open` at `slack.api_url`;
//! `tests/it/socket_mode.rs` runs this mode through `jitbot run` against a
//! Socket Mode fake. Every step after the transport is shared with HTTP mode.

use super::handle::{SlackHandler, SlashCommand};
use super::{Client, SlackAdapter, SlackSetupError};
use crate::chat::render;
use crate::engine::Engine;
use crate::secret::Secret;
use slack_morphism::prelude::*;
use std::sync::Arc;
use tokio::sync::watch;

/// The handler, kept in slack-morphism's user state because its callbacks
/// are plain function pointers.
struct SocketState(Arc<SlackHandler>);

/// Listens until `shutdown` turns true. The callbacks only accept and spawn,
/// because slack-morphism sends the envelope's ack after they return.
pub async fn run_socket_mode(
    engine: Engine,
    adapter: Arc<SlackAdapter>,
    app_token: Secret,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SlackSetupError> {
    let handler = SlackHandler::new(engine, adapter.clone());
    let callbacks = SlackSocketModeListenerCallbacks::new()
        // Slack's `hello` on a new connection: only now is jitbot reachable.
        // (A closure: slack-morphism does not export the event's type.)
        .with_hello_events(|ev, _client, _states| async move {
            tracing::info!(
                connections = ev.num_connections,
                host = %ev.debug_info.host,
                "Slack Socket Mode connected"
            );
        })
        .with_command_events(on_command)
        .with_interaction_events(on_interaction);
    let environment = Arc::new(
        SlackClientEventsListenerEnvironment::new(adapter.client())
            .with_error_handler(on_error)
            .with_user_state(SocketState(handler)),
    );
    let listener =
        SlackClientSocketModeListener::new(&SlackClientSocketModeConfig::new(), environment, callbacks);
    let token = SlackApiToken::new(app_token.expose().to_string().into());
    listener
        .listen_for(&token)
        .await
        .map_err(|e| SlackSetupError::SocketMode(e.to_string()))?;
    listener.start().await;
    // Connections open in the background (and are logged by `on_hello`);
    // slack-morphism retries a failed `apps.connections.open` every 30 s.
    tracing::info!("Slack Socket Mode started");
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    listener.shutdown().await;
    Ok(())
}

async fn handler(states: &SlackClientEventsUserState) -> Option<Arc<SlackHandler>> {
    states
        .read()
        .await
        .get_user_state::<SocketState>()
        .map(|s| s.0.clone())
}

async fn on_command(
    ev: SlackCommandEvent,
    _client: Arc<Client>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<SlackCommandEventResponse> {
    if let Some(h) = handler(&states).await {
        let cmd = SlashCommand {
            user_id: ev.user_id.to_string(),
            channel_id: ev.channel_id.to_string(),
            text: ev.text.unwrap_or_default(),
            response_url: ev.response_url.0.to_string(),
            trigger_id: ev.trigger_id.to_string(),
            // The socket is opened with this app's token, so the app is
            // given; the workspace is still checked.
            origin: super::binding::Origin {
                team: Some(ev.team_id.to_string()),
                ..Default::default()
            },
        };
        if let Err(e) = h.command(cmd).await {
            tracing::warn!(error = %e, "refused a Slack slash command");
            // Nothing will follow: the ack is the only answer.
            return Ok(ephemeral(&e.to_string()));
        }
    }
    Ok(ephemeral(render::WORKING_ON_IT))
}

/// An ephemeral acknowledgement of a slash command.
fn ephemeral(text: &str) -> SlackCommandEventResponse {
    SlackCommandEventResponse::new(SlackMessageContent::new().with_text(super::blocks::escape(text)))
        .with_response_type(SlackMessageResponseType::Ephemeral)
}

async fn on_interaction(
    ev: SlackInteractionEvent,
    _client: Arc<Client>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<()> {
    // Back to Slack's JSON so both modes go through one parser.
    let json = serde_json::to_value(&ev)?;
    if let Some(h) = handler(&states).await {
        if let Err(e) = h.socket_interaction(json).await {
            tracing::warn!(error = %e, "refused a Slack interaction");
        }
    }
    Ok(())
}

fn on_error(
    err: Box<dyn std::error::Error + Send + Sync>,
    _client: Arc<Client>,
    _states: SlackClientEventsUserState,
) -> HttpStatusCode {
    tracing::warn!(error = %err, "Slack Socket Mode error");
    HttpStatusCode::OK
}
