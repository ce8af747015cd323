//! The `/jit` application command: its definition for registration, and the
//! turning of its subcommand and options into the shared [`Command`]. Names
//! and durations go through [`Command::parse`], so they are checked exactly
//! as on every other platform; free-text reasons are kept verbatim.

use super::interaction::Invocation;
use jitbot_core::command::{Command, ParseError, MAX_REASON_CHARS};
use jitbot_core::Span;
use serenity::all::{CommandOptionType, CreateCommand, CreateCommandOption};

/// The top-level command's name.
pub const NAME: &str = "jit";

fn text(name: &str, description: &str, required: bool) -> CreateCommandOption {
    CreateCommandOption::new(CommandOptionType::String, name, description).required(required)
}

fn group_option() -> CreateCommandOption {
    text("group", "The group, e.g. db-admins", true).set_autocomplete(true)
}

fn sub(name: &str, description: &str, options: Vec<CreateCommandOption>) -> CreateCommandOption {
    let mut s = CreateCommandOption::new(CommandOptionType::SubCommand, name, description);
    for o in options {
        s = s.add_sub_option(o);
    }
    s
}

/// `/jit` with every subcommand. Registered with a bulk overwrite, so
/// registering it again at each start is harmless.
pub fn definition() -> CreateCommand {
    let duration = |required| text("duration", "How long, e.g. 2h or 1h30m", required);
    let reason = |required| text("reason", "Why", required).max_length(MAX_REASON_CHARS as u16);
    let id = |name: &str, what: &str| text(name, what, true);
    CreateCommand::new(NAME)
        .description("Just-in-time group membership")
        .add_option(sub(
            "request",
            "Ask for temporary membership in a group",
            vec![group_option(), duration(false), reason(false)],
        ))
        .add_option(sub(
            "breakglass",
            "Self-approve where the group allows it; approvers are alerted",
            vec![group_option(), duration(false), reason(false)],
        ))
        .add_option(sub("list", "Your leases and pending requests", vec![]))
        .add_option(sub(
            "release",
            "Give a membership back now",
            vec![id("target", "Lease id or group")],
        ))
        .add_option(sub(
            "extend",
            "Ask for more time",
            vec![id("target", "Lease id or group"), duration(true)],
        ))
        .add_option(sub("groups", "Groups you may request", vec![]))
        .add_option(sub("pending", "Requests you may approve", vec![]))
        .add_option(sub("help", "How to use jitbot", vec![]))
        .add_option(sub(
            "approve",
            "Approve a request (approvers)",
            vec![id("request", "Request id, e.g. r-12"), duration(false)],
        ))
        .add_option(sub(
            "deny",
            "Deny a request (approvers)",
            vec![id("request", "Request id, e.g. r-12"), reason(true)],
        ))
        .add_option(sub(
            "cancel",
            "Withdraw your pending request",
            vec![id("request", "Request id")],
        ))
        .add_option(sub(
            "revoke",
            "End someone's lease (approvers, admins)",
            vec![id("lease", "Lease id"), reason(true)],
        ))
        .add_option(sub(
            "ack",
            "Acknowledge a break-glass grant",
            vec![id("request", "Request id")],
        ))
}

/// The command an invocation stands for.
pub fn to_command(inv: &Invocation) -> Result<Command, ParseError> {
    // One word each: a space inside would shift the words `parse` sees.
    let word = |name: &str| -> Result<Option<&str>, ParseError> {
        match inv.options.get(name).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) if v.split_whitespace().count() == 1 => Ok(Some(v)),
            Some(v) => Err(ParseError::BadName(v.chars().take(80).collect())),
        }
    };
    let reason = || -> Result<String, ParseError> {
        let r = inv
            .options
            .get("reason")
            .map(|r| r.trim().to_string())
            .unwrap_or_default();
        if r.chars().count() > MAX_REASON_CHARS {
            return Err(ParseError::ReasonTooLong);
        }
        Ok(r)
    };
    let duration = || -> Result<Option<Span>, ParseError> {
        word("duration")?.map(str::parse).transpose().map_err(Into::into)
    };
    let sub = inv.sub.as_str();
    match sub {
        "request" | "breakglass" => {
            let group = word("group")?.unwrap_or_default();
            // Parse the group alone, then set duration and reason: a reason
            // that starts with a digit must not be read as a duration.
            let duration = duration()?;
            let reason = reason()?;
            Ok(match Command::parse(&format!("{sub} {group}"))? {
                Command::Request { group, .. } => Command::Request {
                    group,
                    duration,
                    reason,
                },
                Command::BreakGlass { group, .. } => Command::BreakGlass {
                    group,
                    duration,
                    reason,
                },
                other => other,
            })
        }
        "deny" | "revoke" => {
            let target = word(if sub == "deny" { "request" } else { "lease" })?.unwrap_or_default();
            let reason = reason()?;
            Ok(match Command::parse(&format!("{sub} {target}"))? {
                Command::Deny { request, .. } => Command::Deny { request, reason },
                Command::Revoke { lease, .. } => Command::Revoke { lease, reason },
                other => other,
            })
        }
        _ => {
            let mut words = vec![sub.to_string()];
            for name in ["target", "request", "lease", "duration"] {
                if let Some(w) = word(name)? {
                    words.push(w.to_string());
                }
            }
            Command::parse(&words.join(" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::discord::interaction::Origin;
    use jitbot_core::GroupName;

    fn inv(sub: &str, options: &[(&str, &str)]) -> Invocation {
        Invocation {
            origin: Origin {
                id: "1".into(),
                token: "t".into(),
                user: "u".into(),
                channel: None,
            },
            command: NAME.into(),
            sub: sub.into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            focused: None,
        }
    }

    #[test]
    fn options_become_the_shared_commands() {
        let cases = [
            (
                inv(
                    "request",
                    &[("group", "db-admins"), ("reason", "3 replicas down")],
                ),
                Command::Request {
                    group: GroupName::new("db-admins"),
                    duration: None,
                    reason: "3 replicas down".into(),
                },
            ),
            (
                inv(
                    "request",
                    &[("group", "db-admins"), ("duration", "2h"), ("reason", "x")],
                ),
                Command::Request {
                    group: GroupName::new("db-admins"),
                    duration: Some(Span::from_hours(2)),
                    reason: "x".into(),
                },
            ),
            (inv("list", &[]), Command::List),
            (inv("help", &[]), Command::Help),
            (
                inv("deny", &[("request", "r-1"), ("reason", "2 many")]),
                Command::Deny {
                    request: "r-1".into(),
                    reason: "2 many".into(),
                },
            ),
            (
                inv("extend", &[("target", "l-1"), ("duration", "1h")]),
                Command::Extend {
                    target: "l-1".into(),
                    duration: Span::from_hours(1),
                },
            ),
            (
                inv("ack", &[("request", "r-2")]),
                Command::Acknowledge {
                    request: "r-2".into(),
                },
            ),
        ];
        for (i, want) in cases {
            assert_eq!(to_command(&i).unwrap(), want, "{i:?}");
        }
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(to_command(&inv("request", &[("group", "db admins")])).is_err());
        assert!(to_command(&inv("request", &[("group", "*)(uid=*")])).is_err());
        assert!(to_command(&inv("request", &[("group", "db"), ("duration", "soon")])).is_err());
        assert!(to_command(&inv("frobnicate", &[])).is_err());
        let long = "x".repeat(MAX_REASON_CHARS + 1);
        assert_eq!(
            to_command(&inv("deny", &[("request", "r-1"), ("reason", &long)])),
            Err(ParseError::ReasonTooLong)
        );
    }
}
