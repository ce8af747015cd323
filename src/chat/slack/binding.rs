//! Workspace binding: jitbot serves one Slack workspace (`slack.team_id`)
//! and, optionally, one app (`slack.app_id`) in one Enterprise Grid org
//! (`slack.enterprise_id`). A signed payload from anywhere else is refused,
//! and so is a click by a user from another workspace (Slack Connect shares
//! channels, and with them approval cards, across organisations).

use crate::config::SlackConfig;
use serde_json::Value;

/// Why a payload does not belong to the configured workspace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("it comes from Slack workspace `{got}`, but this jitbot serves `{want}` (slack.team_id)")]
    Workspace { got: String, want: String },
    #[error("it was sent to Slack app `{got}`, but this jitbot is app `{want}` (slack.app_id)")]
    App { got: String, want: String },
    #[error(
        "it comes from Enterprise Grid org `{got}`, but this jitbot serves `{want}` (slack.enterprise_id)"
    )]
    Enterprise { got: String, want: String },
    #[error("the user belongs to Slack workspace `{got}`, not to `{want}`")]
    ExternalUser { got: String, want: String },
}

impl Mismatch {
    /// A short label for logs and the refusal counter.
    pub fn kind(&self) -> &'static str {
        match self {
            Mismatch::Workspace { .. } => "workspace",
            Mismatch::App { .. } => "app",
            Mismatch::Enterprise { .. } => "enterprise",
            Mismatch::ExternalUser { .. } => "external_user",
        }
    }

    /// What the person who clicked is told.
    pub fn user_message(&self) -> String {
        match self {
            Mismatch::ExternalUser { .. } => {
                "jitbot takes commands and clicks only from members of its own Slack workspace; \
                 ask someone in that workspace to act on this request."
                    .to_string()
            }
            other => format!("jitbot refused this payload: {other}."),
        }
    }
}

/// The ids a payload claims to come from; `None` where it carries none.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Origin {
    pub team: Option<String>,
    pub app: Option<String>,
    pub enterprise: Option<String>,
    /// The acting user's home workspace (`user.team_id`), when given.
    pub user_team: Option<String>,
}

impl Origin {
    /// The ids in an interaction payload (`team.id`, `api_app_id`,
    /// `enterprise.id` or `enterprise_id`, `user.team_id`).
    pub fn of_interaction(payload: &Value) -> Origin {
        let text = |v: &Value| v.as_str().map(str::to_string);
        Origin {
            team: payload["team"]["id"].as_str().map(str::to_string),
            // Present in every interaction: a missing one reads as empty, so
            // a configured app_id refuses it.
            app: Some(text(&payload["api_app_id"]).unwrap_or_default()),
            enterprise: text(&payload["enterprise"]["id"]).or_else(|| text(&payload["enterprise_id"])),
            user_team: text(&payload["user"]["team_id"]),
        }
    }
}

/// Checks payloads against the configured workspace.
#[derive(Debug, Clone)]
pub struct Binding {
    team: String,
    app: Option<String>,
    enterprise: Option<String>,
}

impl Binding {
    pub fn new(config: &SlackConfig) -> Binding {
        Binding {
            team: config.team_id.trim().to_string(),
            app: config.app_id.clone(),
            enterprise: config.enterprise_id.clone(),
        }
    }

    /// `Ok` when the payload belongs here. The team must be present and
    /// equal (an unconfigured, empty team refuses everything); the app and
    /// org are checked when configured and the payload names them; the
    /// user's home workspace, when given, must be ours.
    pub fn check(&self, origin: &Origin) -> Result<(), Mismatch> {
        let team = origin.team.as_deref().unwrap_or_default();
        if self.team.is_empty() || team != self.team {
            return Err(Mismatch::Workspace {
                got: shown(team),
                want: self.team.clone(),
            });
        }
        if let (Some(want), Some(got)) = (&self.app, &origin.app) {
            if got != want {
                return Err(Mismatch::App {
                    got: shown(got),
                    want: want.clone(),
                });
            }
        }
        if let (Some(want), Some(got)) = (&self.enterprise, &origin.enterprise) {
            if got != want {
                return Err(Mismatch::Enterprise {
                    got: shown(got),
                    want: want.clone(),
                });
            }
        }
        if let Some(user_team) = &origin.user_team {
            if *user_team != self.team {
                return Err(Mismatch::ExternalUser {
                    got: shown(user_team),
                    want: self.team.clone(),
                });
            }
        }
        Ok(())
    }
}

/// An id as logged: at most 40 characters, `(none)` when empty.
fn shown(id: &str) -> String {
    if id.is_empty() {
        "(none)".to_string()
    } else {
        id.chars().take(40).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn binding(app: Option<&str>, enterprise: Option<&str>) -> Binding {
        Binding {
            team: "T1".into(),
            app: app.map(str::to_string),
            enterprise: enterprise.map(str::to_string),
        }
    }

    #[test]
    fn interactions_from_elsewhere_are_refused() {
        let ok = json!({"team": {"id": "T1"}, "api_app_id": "A1", "user": {"id": "U1", "team_id": "T1"}});
        let b = binding(Some("A1"), Some("E1"));
        assert_eq!(b.check(&Origin::of_interaction(&ok)), Ok(()));
        let cases = [
            (json!({"team": {"id": "T2"}, "api_app_id": "A1"}), "workspace"),
            (json!({"api_app_id": "A1"}), "workspace"),
            (json!({"team": {"id": "T1"}, "api_app_id": "A2"}), "app"),
            (json!({"team": {"id": "T1"}}), "app"),
            (
                json!({"team": {"id": "T1"}, "api_app_id": "A1", "enterprise": {"id": "E2"}}),
                "enterprise",
            ),
            (
                json!({"team": {"id": "T1"}, "api_app_id": "A1", "user": {"id": "U9", "team_id": "T9"}}),
                "external_user",
            ),
        ];
        for (payload, kind) in cases {
            let err = b.check(&Origin::of_interaction(&payload)).unwrap_err();
            assert_eq!(err.kind(), kind, "{payload}");
            assert!(!err.user_message().is_empty());
        }
    }

    #[test]
    fn optional_ids_are_checked_only_when_configured_and_an_empty_team_refuses_all() {
        let b = binding(None, None);
        let other_app = json!({"team": {"id": "T1"}, "api_app_id": "A2", "enterprise_id": "E7"});
        assert_eq!(b.check(&Origin::of_interaction(&other_app)), Ok(()));
        let unset = Binding {
            team: String::new(),
            app: None,
            enterprise: None,
        };
        let origin = Origin {
            team: Some(String::new()),
            ..Origin::default()
        };
        assert!(unset.check(&origin).is_err());
    }
}
