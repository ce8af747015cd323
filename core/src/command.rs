//! The command model shared by every chat platform. Adapters turn a slash
//! command's text, or a button's action id, into a [`Command`]; the engine
//! applies it. Parsing is here, once, for Slack, Discord and the web console.

use crate::span::SpanError;
use crate::{GroupName, Span};
use thiserror::Error;

/// Longest reason kept; longer text is refused rather than cut silently.
pub const MAX_REASON_CHARS: usize = 500;
const MAX_NAME_CHARS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `request <group> [duration] <reason>`
    Request {
        group: GroupName,
        duration: Option<Span>,
        reason: String,
    },
    /// `breakglass <group> [duration] <reason>`: request and self-approve.
    BreakGlass {
        group: GroupName,
        duration: Option<Span>,
        reason: String,
    },
    /// `list`: my leases and pending requests.
    List,
    /// `release <lease|group>`: check in early.
    Release { target: String },
    /// `extend <lease|group> <duration>`
    Extend { target: String, duration: Span },
    /// `groups`: what I may request.
    Groups,
    /// `pending`: what I may approve, and break-glass grants awaiting review.
    Pending,
    /// `approve <request> [shorter-duration]`
    Approve { request: String, duration: Option<Span> },
    /// `deny <request> <reason>`
    Deny { request: String, reason: String },
    /// `cancel <request>`: withdraw my pending request.
    Cancel { request: String },
    /// `revoke <lease> <reason>`: an approver or admin ends a lease.
    Revoke { lease: String, reason: String },
    /// `ack <request>`: review a break-glass grant.
    Acknowledge { request: String },
    /// `help`
    Help,
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("unknown command `{0}`; try `/jit help`")]
    UnknownCommand(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("`{0}` is not a valid name: use letters, digits, `-`, `_` or `.` (at most 64)")]
    BadName(String),
    #[error(transparent)]
    Duration(#[from] SpanError),
    #[error("the reason is too long: keep it under {MAX_REASON_CHARS} characters")]
    ReasonTooLong,
    #[error("unknown button `{0}`")]
    UnknownAction(String),
}

pub const HELP: &str = "\
/jit request <group> [duration] <reason>   ask for temporary membership (e.g. /jit request db-admins 2h fixing replication)
/jit breakglass <group> [duration] <reason> self-approve where the group allows it; every approver is alerted
/jit list                                  your leases and pending requests
/jit release <lease|group>                 give the membership back now
/jit extend <lease|group> <duration>       ask for more time
/jit groups                                groups you may request
/jit pending                               requests you may approve, break-glass grants to review
/jit approve <request> [shorter duration]  approve (approvers)
/jit deny <request> <reason>               deny (approvers)
/jit cancel <request>                      withdraw your pending request
/jit revoke <lease> <reason>               end someone's lease (approvers, admins)
/jit ack <request>                         acknowledge a break-glass grant (approvers)";

fn name(token: &str) -> Result<String, ParseError> {
    let ok = !token.is_empty()
        && token.chars().count() <= MAX_NAME_CHARS
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(token.to_string())
    } else {
        Err(ParseError::BadName(token.chars().take(80).collect()))
    }
}

fn reason(words: &[&str]) -> Result<String, ParseError> {
    let text = words.join(" ");
    if text.chars().count() > MAX_REASON_CHARS {
        return Err(ParseError::ReasonTooLong);
    }
    Ok(text)
}

/// Splits `[duration] reason...`: the first word is a duration only if it
/// reads as one, so "/jit request db 2h fix" and "/jit request db fix" both work.
fn duration_and_reason(words: &[&str]) -> Result<(Option<Span>, String), ParseError> {
    match words.split_first() {
        Some((first, rest)) if looks_like_duration(first) => Ok((Some(first.parse()?), reason(rest)?)),
        _ => Ok((None, reason(words)?)),
    }
}

/// A word that starts with a digit, or a sign then a digit (`-5m`, `+2h`),
/// was meant as a duration: it is parsed as one and refused if it is not a
/// valid one, never swallowed into the reason.
fn looks_like_duration(word: &str) -> bool {
    let unsigned = word.strip_prefix(['-', '+']).unwrap_or(word);
    unsigned.starts_with(|c: char| c.is_ascii_digit())
}

impl Command {
    /// Parses the text after `/jit`.
    pub fn parse(text: &str) -> Result<Command, ParseError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let Some((verb, args)) = words.split_first() else {
            return Ok(Command::Help);
        };
        let cmd = match (verb.to_ascii_lowercase().as_str(), args) {
            ("request", [group, rest @ ..]) | ("req", [group, rest @ ..]) => {
                let (duration, reason) = duration_and_reason(rest)?;
                Command::Request {
                    group: GroupName::new(name(group)?),
                    duration,
                    reason,
                }
            }
            ("request", []) => return Err(ParseError::Usage("/jit request <group> [duration] <reason>")),
            ("breakglass", [group, rest @ ..]) => {
                let (duration, reason) = duration_and_reason(rest)?;
                Command::BreakGlass {
                    group: GroupName::new(name(group)?),
                    duration,
                    reason,
                }
            }
            ("breakglass", []) => {
                return Err(ParseError::Usage("/jit breakglass <group> [duration] <reason>"))
            }
            ("list", []) => Command::List,
            ("groups", []) => Command::Groups,
            ("pending", []) => Command::Pending,
            ("help", _) => Command::Help,
            ("release", [target]) => Command::Release {
                target: name(target)?,
            },
            ("release", _) => return Err(ParseError::Usage("/jit release <lease|group>")),
            ("extend", [target, duration]) => Command::Extend {
                target: name(target)?,
                duration: duration.parse()?,
            },
            ("extend", _) => return Err(ParseError::Usage("/jit extend <lease|group> <duration>")),
            ("approve", [request]) => Command::Approve {
                request: name(request)?,
                duration: None,
            },
            ("approve", [request, duration]) => Command::Approve {
                request: name(request)?,
                duration: Some(duration.parse()?),
            },
            ("approve", _) => return Err(ParseError::Usage("/jit approve <request> [shorter duration]")),
            ("deny", [request, rest @ ..]) => Command::Deny {
                request: name(request)?,
                reason: reason(rest)?,
            },
            ("deny", _) => return Err(ParseError::Usage("/jit deny <request> <reason>")),
            ("cancel", [request]) => Command::Cancel {
                request: name(request)?,
            },
            ("cancel", _) => return Err(ParseError::Usage("/jit cancel <request>")),
            ("revoke", [lease, rest @ ..]) => Command::Revoke {
                lease: name(lease)?,
                reason: reason(rest)?,
            },
            ("revoke", _) => return Err(ParseError::Usage("/jit revoke <lease> <reason>")),
            ("ack", [request]) => Command::Acknowledge {
                request: name(request)?,
            },
            ("ack", _) => return Err(ParseError::Usage("/jit ack <request>")),
            ("list" | "groups" | "pending", _) => {
                return Err(ParseError::Usage("this command takes no arguments"))
            }
            (other, _) => return Err(ParseError::UnknownCommand(other.chars().take(40).collect())),
        };
        Ok(cmd)
    }
}

/// A button on a chat message. Its id is `jit:<verb>:<target>` on every platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Approve(String),
    /// Deny asks for a reason first (a modal); the reason arrives with the submit.
    Deny(String),
    Extend(String),
    Release(String),
    Acknowledge(String),
}

impl Action {
    pub fn id(&self) -> String {
        let (verb, target) = match self {
            Action::Approve(t) => ("approve", t),
            Action::Deny(t) => ("deny", t),
            Action::Extend(t) => ("extend", t),
            Action::Release(t) => ("release", t),
            Action::Acknowledge(t) => ("ack", t),
        };
        format!("jit:{verb}:{target}")
    }

    pub fn parse(id: &str) -> Result<Action, ParseError> {
        let unknown = || ParseError::UnknownAction(id.chars().take(80).collect());
        let mut parts = id.splitn(3, ':');
        let (Some("jit"), Some(verb), Some(target)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(unknown());
        };
        let target = name(target).map_err(|_| unknown())?;
        Ok(match verb {
            "approve" => Action::Approve(target),
            "deny" => Action::Deny(target),
            "extend" => Action::Extend(target),
            "release" => Action::Release(target),
            "ack" => Action::Acknowledge(target),
            _ => return Err(unknown()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(group: &str, duration: Option<u64>, reason: &str) -> Command {
        Command::Request {
            group: GroupName::new(group),
            duration: duration.map(Span::from_secs),
            reason: reason.into(),
        }
    }

    #[test]
    fn parses_every_command() {
        let cases = [
            (
                "request db-admins 2h fixing replication",
                req("db-admins", Some(7200), "fixing replication"),
            ),
            ("request db-admins fixing it", req("db-admins", None, "fixing it")),
            ("  REQUEST   db-admins   30m  ", req("db-admins", Some(1800), "")),
            ("list", Command::List),
            ("", Command::Help),
            ("help me", Command::Help),
            ("groups", Command::Groups),
            ("pending", Command::Pending),
            (
                "release db-admins",
                Command::Release {
                    target: "db-admins".into(),
                },
            ),
            (
                "extend l-123 1h",
                Command::Extend {
                    target: "l-123".into(),
                    duration: Span::from_hours(1),
                },
            ),
            (
                "approve r-1 30m",
                Command::Approve {
                    request: "r-1".into(),
                    duration: Some(Span::from_mins(30)),
                },
            ),
            (
                "deny r-1 not during the freeze",
                Command::Deny {
                    request: "r-1".into(),
                    reason: "not during the freeze".into(),
                },
            ),
            (
                "cancel r-1",
                Command::Cancel {
                    request: "r-1".into(),
                },
            ),
            (
                "revoke l-1 left the team",
                Command::Revoke {
                    lease: "l-1".into(),
                    reason: "left the team".into(),
                },
            ),
            (
                "ack r-9",
                Command::Acknowledge {
                    request: "r-9".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Command::parse(text).unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn explains_mistakes() {
        type Check = fn(&ParseError) -> bool;
        let cases: [(&str, Check); 7] = [
            ("frobnicate", |e| matches!(e, ParseError::UnknownCommand(_))),
            ("request", |e| matches!(e, ParseError::Usage(_))),
            ("request *)(uid=* 1h x", |e| matches!(e, ParseError::BadName(_))),
            ("request db 5x oops", |e| matches!(e, ParseError::Duration(_))),
            ("request db 0s oops", |e| {
                matches!(e, ParseError::Duration(SpanError::Zero))
            }),
            ("extend l-1 soon", |e| matches!(e, ParseError::Duration(_))),
            ("list everything", |e| matches!(e, ParseError::Usage(_))),
        ];
        for (text, check) in cases {
            let err = Command::parse(text).unwrap_err();
            assert!(check(&err), "{text:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("request db 1h {}", "x".repeat(MAX_REASON_CHARS + 1));
        assert_eq!(Command::parse(&long), Err(ParseError::ReasonTooLong));
    }

    #[test]
    fn a_bad_duration_after_the_group_is_refused_not_taken_as_the_reason() {
        for verb in ["request", "breakglass"] {
            for (token, check) in [
                (
                    "-5m",
                    (|e| matches!(e, SpanError::Invalid(_))) as fn(&SpanError) -> bool,
                ),
                ("+5m", |e| matches!(e, SpanError::Invalid(_))),
                ("-1", |e| matches!(e, SpanError::Invalid(_))),
                ("0m", |e| matches!(e, SpanError::Zero)),
                ("99999y", |e| matches!(e, SpanError::TooLong(_))),
                ("367d", |e| matches!(e, SpanError::TooLong(_))),
            ] {
                let text = format!("{verb} db-admins {token} fixing replication");
                match Command::parse(&text) {
                    Err(ParseError::Duration(e)) => assert!(check(&e), "{text:?} gave {e:?}"),
                    other => panic!("{text:?} gave {other:?}"),
                }
            }
        }
        for (text, token) in [
            ("approve r-1 -5m", "-5m"),
            ("extend l-1 99999y", "99999y"),
            ("approve r-1 0m", "0m"),
        ] {
            assert!(
                matches!(Command::parse(text), Err(ParseError::Duration(_))),
                "{token} in {text:?}"
            );
        }
        // A reason that merely starts with a dash is still a reason.
        assert_eq!(
            Command::parse("request db-admins - see ticket").unwrap(),
            req("db-admins", None, "- see ticket")
        );
    }

    #[test]
    fn long_or_strange_input_never_panics() {
        for text in [
            "request db 18446744073709551615s x",
            "request db 9999999999999999999999999d x",
            "request db -9223372036854775808s x",
            "extend l-1 1000000000y",
            "request db 1e9s x",
            "request db \u{0}5m x",
        ] {
            let _ = Command::parse(text);
        }
    }

    #[test]
    fn action_ids_round_trip() {
        for a in [
            Action::Approve("r-1".into()),
            Action::Deny("r-1".into()),
            Action::Extend("l-2".into()),
            Action::Release("l-2".into()),
            Action::Acknowledge("r-3".into()),
        ] {
            assert_eq!(Action::parse(&a.id()).unwrap(), a);
        }
        for bad in [
            "",
            "jit",
            "jit:approve",
            "jit:launch:r-1",
            "x:approve:r-1",
            "jit:approve:r 1",
        ] {
            assert!(Action::parse(bad).is_err(), "{bad:?}");
        }
    }
}
