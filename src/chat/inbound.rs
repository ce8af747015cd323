//! The one inbound route every platform shares. Adapters decode their wire
//! format (a Slack `block_actions`, a Discord `INTERACTION_CREATE`, the web
//! console's JSON) into an [`Action`] or a deny reason, and encode what this
//! module answers back into their own format; which command a button runs,
//! that Deny first asks for a reason, and what a useless button answers are
//! decided here only.

use super::render;
use crate::engine::Engine;
use jitbot_core::command::{Action, Command, ParseError, MAX_REASON_CHARS};

/// What a button click asks of the platform.
#[derive(Debug, PartialEq, Eq)]
pub enum Click {
    /// Run this command as the clicker, and answer with its reply.
    Run(Command),
    /// Deny needs a reason: ask for it (a modal, a form), then run [`deny`].
    AskDenyReason { request: String },
    /// Nothing to run: answer this.
    Answer(&'static str),
}

/// What a click on `action` asks for.
pub fn click(engine: &Engine, action: &Action) -> Click {
    if let Action::Deny(request) = action {
        return Click::AskDenyReason {
            request: request.clone(),
        };
    }
    match engine.command_for(action) {
        Some(command) => Click::Run(command),
        None => Click::Answer(render::BUTTON_DOES_NOTHING),
    }
}

/// The deny command for a reason typed into a platform's form; refused,
/// with the answer to give, when the reason is empty or too long.
pub fn deny(request: &str, reason: &str) -> Result<Command, String> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(render::REASON_REQUIRED.to_string());
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ParseError::ReasonTooLong.to_string());
    }
    Ok(Command::Deny {
        request: request.to_string(),
        reason: reason.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deny_reason_is_required_and_bounded() {
        assert_eq!(
            deny("r-1", "  not now "),
            Ok(Command::Deny {
                request: "r-1".into(),
                reason: "not now".into()
            })
        );
        assert_eq!(deny("r-1", "  "), Err(render::REASON_REQUIRED.to_string()));
        assert!(deny("r-1", &"x".repeat(MAX_REASON_CHARS + 1)).is_err());
    }
}
