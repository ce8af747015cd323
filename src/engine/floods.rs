//! Flood control: one person can keep at most
//! [`EngineSettings::max_pending_per_user`](super::EngineSettings) requests
//! waiting for a decision, so a requester cannot bury the approval channel
//! (and the break-glass and drift alerts in it) under hundreds of cards.

use super::{Engine, EngineError};
use jitbot_core::request::RequestState;
use jitbot_core::{AccessRequest, Refusal};

impl Engine {
    /// Refuses `request` if it would wait for a decision while its requester
    /// already has the most pending requests allowed. Requests granted at
    /// once (auto-approval, break-glass) are never held back. Called under
    /// the store's writer lock, so two requests cannot both take the last slot.
    pub(super) fn within_pending_cap(&self, request: &AccessRequest) -> Result<(), EngineError> {
        if request.state != RequestState::Pending {
            return Ok(());
        }
        let max = self.inner.settings.max_pending_per_user;
        let mine: Vec<String> = self
            .inner
            .store
            .pending_requests()?
            .into_iter()
            .filter(|rec| rec.request.requester == request.requester)
            .map(|rec| rec.request.id.to_string())
            .collect();
        if mine.len() < max {
            return Ok(());
        }
        let mut shown: Vec<&str> = mine.iter().take(5).map(String::as_str).collect();
        if mine.len() > shown.len() {
            shown.push("…");
        }
        Err(Refusal::TooManyPending {
            count: mine.len(),
            requests: shown.join(", "),
        }
        .into())
    }
}
