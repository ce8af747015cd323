//! The interactions jitbot understands, in one small shape whichever way
//! they arrived: parsed leniently from the HTTP endpoint's JSON, or converted
//! from serenity's gateway model. [`super::handle`] only ever sees this.

use serde::Deserialize;
use serenity::all::{ActionRowComponent, CommandDataOption, CommandDataOptionValue, Interaction};
use std::collections::BTreeMap;

/// Who sent an interaction and how to answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The interaction's id (needed to answer over the REST API).
    pub id: String,
    /// The interaction token (answers and edits for 15 minutes).
    pub token: String,
    /// The Discord user id.
    pub user: String,
    pub channel: Option<String>,
}

/// `/jit <sub> [options]`, as a command or while the user is typing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub origin: Origin,
    /// The top-level command's name (`jit`).
    pub command: String,
    pub sub: String,
    /// Option name → value, as text.
    pub options: BTreeMap<String, String>,
    /// The option being typed (autocomplete only).
    pub focused: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Ping,
    Command(Invocation),
    Autocomplete(Invocation),
    /// A button: its `custom_id`.
    Button {
        origin: Origin,
        custom_id: String,
    },
    /// A modal submit: its `custom_id` and text inputs.
    Modal {
        origin: Origin,
        custom_id: String,
        fields: BTreeMap<String, String>,
    },
}

/// Why a payload cannot be handled at all (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("malformed interaction: {0}")]
    Malformed(String),
    #[error("unknown interaction type {0}")]
    UnknownType(u64),
    #[error("unknown command `{0}`")]
    UnknownCommand(String),
    #[error("unknown component `{0}`")]
    UnknownComponent(String),
    /// A replay (a gateway RESUME) of an interaction whose first delivery is
    /// still being answered: the first answer is the one Discord shows, so
    /// the replay gets none.
    #[error("interaction {0} arrived again while its first delivery is still being answered")]
    InFlight(String),
}

// Only the fields jitbot reads; everything else Discord sends is ignored,
// so a new field on Discord's side never breaks the endpoint.
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: u64,
    id: Option<String>,
    token: Option<String>,
    channel_id: Option<String>,
    member: Option<RawMember>,
    user: Option<RawUser>,
    data: Option<RawData>,
}

#[derive(Deserialize)]
struct RawMember {
    user: RawUser,
}

#[derive(Deserialize)]
struct RawUser {
    id: String,
}

#[derive(Deserialize, Default)]
struct RawData {
    name: Option<String>,
    #[serde(default)]
    options: Vec<RawOption>,
    custom_id: Option<String>,
    #[serde(default)]
    components: Vec<RawRow>,
}

#[derive(Deserialize)]
struct RawOption {
    name: String,
    value: Option<serde_json::Value>,
    #[serde(default)]
    options: Vec<RawOption>,
    #[serde(default)]
    focused: bool,
}

#[derive(Deserialize)]
struct RawRow {
    #[serde(default)]
    components: Vec<RawInput>,
}

#[derive(Deserialize)]
struct RawInput {
    custom_id: Option<String>,
    value: Option<String>,
}

impl Incoming {
    /// Parses the HTTP endpoint's body.
    pub fn from_json(body: &[u8]) -> Result<Incoming, Rejected> {
        let raw: Raw = serde_json::from_slice(body).map_err(|e| Rejected::Malformed(e.to_string()))?;
        if raw.kind == 1 {
            return Ok(Incoming::Ping);
        }
        let missing = |what: &str| Rejected::Malformed(format!("no {what}"));
        let user = raw
            .member
            .map(|m| m.user.id)
            .or(raw.user.map(|u| u.id))
            .ok_or_else(|| missing("user"))?;
        let origin = Origin {
            id: raw.id.ok_or_else(|| missing("id"))?,
            token: raw.token.ok_or_else(|| missing("token"))?,
            user,
            channel: raw.channel_id,
        };
        let data = raw.data.ok_or_else(|| missing("data"))?;
        match raw.kind {
            2 | 4 => {
                let command = data.name.ok_or_else(|| missing("command name"))?;
                let mut sub = String::new();
                let mut options = BTreeMap::new();
                let mut focused = None;
                for top in data.options {
                    sub = top.name;
                    for o in top.options {
                        if o.focused {
                            focused = Some(o.name.clone());
                        }
                        let value = match o.value {
                            Some(serde_json::Value::String(s)) => s,
                            Some(other) => other.to_string(),
                            None => continue,
                        };
                        options.insert(o.name, value);
                    }
                }
                let inv = Invocation {
                    origin,
                    command,
                    sub,
                    options,
                    focused,
                };
                Ok(if raw.kind == 2 {
                    Incoming::Command(inv)
                } else {
                    Incoming::Autocomplete(inv)
                })
            }
            3 => Ok(Incoming::Button {
                origin,
                custom_id: data.custom_id.ok_or_else(|| missing("custom_id"))?,
            }),
            5 => {
                let fields = data
                    .components
                    .into_iter()
                    .flat_map(|row| row.components)
                    .filter_map(|i| Some((i.custom_id?, i.value.unwrap_or_default())))
                    .collect();
                Ok(Incoming::Modal {
                    origin,
                    custom_id: data.custom_id.ok_or_else(|| missing("custom_id"))?,
                    fields,
                })
            }
            other => Err(Rejected::UnknownType(other)),
        }
    }

    /// Converts serenity's gateway model.
    pub fn from_serenity(interaction: &Interaction) -> Result<Incoming, Rejected> {
        let origin = |id: String, token: &str, user: String, channel: String| Origin {
            id,
            token: token.to_string(),
            user,
            channel: Some(channel),
        };
        Ok(match interaction {
            Interaction::Ping(_) => Incoming::Ping,
            Interaction::Command(c) | Interaction::Autocomplete(c) => {
                let user = c.member.as_ref().map(|m| m.user.id).unwrap_or(c.user.id);
                let o = origin(
                    c.id.to_string(),
                    &c.token,
                    user.to_string(),
                    c.channel_id.to_string(),
                );
                let mut inv = Invocation {
                    origin: o,
                    command: c.data.name.clone(),
                    sub: String::new(),
                    options: BTreeMap::new(),
                    focused: None,
                };
                for top in &c.data.options {
                    inv.sub = top.name.clone();
                    if let CommandDataOptionValue::SubCommand(opts) = &top.value {
                        opts.iter().for_each(|o| option(&mut inv, o));
                    }
                }
                if matches!(interaction, Interaction::Command(_)) {
                    Incoming::Command(inv)
                } else {
                    Incoming::Autocomplete(inv)
                }
            }
            Interaction::Component(c) => {
                let user = c.member.as_ref().map(|m| m.user.id).unwrap_or(c.user.id);
                Incoming::Button {
                    origin: origin(
                        c.id.to_string(),
                        &c.token,
                        user.to_string(),
                        c.channel_id.to_string(),
                    ),
                    custom_id: c.data.custom_id.clone(),
                }
            }
            Interaction::Modal(m) => {
                let user = m.member.as_ref().map(|m| m.user.id).unwrap_or(m.user.id);
                let fields = m
                    .data
                    .components
                    .iter()
                    .flat_map(|row| &row.components)
                    .filter_map(|c| match c {
                        ActionRowComponent::InputText(t) => {
                            Some((t.custom_id.clone(), t.value.clone().unwrap_or_default()))
                        }
                        _ => None,
                    })
                    .collect();
                Incoming::Modal {
                    origin: origin(
                        m.id.to_string(),
                        &m.token,
                        user.to_string(),
                        m.channel_id.to_string(),
                    ),
                    custom_id: m.data.custom_id.clone(),
                    fields,
                }
            }
            other => return Err(Rejected::UnknownType(u8::from(other.kind()).into())),
        })
    }
}

fn option(inv: &mut Invocation, o: &CommandDataOption) {
    let value = match &o.value {
        CommandDataOptionValue::String(s) => s.clone(),
        CommandDataOptionValue::Autocomplete { value, .. } => {
            inv.focused = Some(o.name.clone());
            value.clone()
        }
        CommandDataOptionValue::Integer(i) => i.to_string(),
        _ => return,
    };
    inv.options.insert(o.name.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_slash_command_with_subcommand_options() {
        let body = br#"{"type":2,"id":"9","token":"t","channel_id":"c1","member":{"user":{"id":"u1"}},
            "data":{"name":"jit","options":[{"name":"request","type":1,"options":[
                {"name":"group","type":3,"value":"db-admins"},{"name":"duration","type":3,"value":"2h"}]}]}}"#;
        let Incoming::Command(inv) = Incoming::from_json(body).unwrap() else {
            panic!("not a command")
        };
        assert_eq!((inv.command.as_str(), inv.sub.as_str()), ("jit", "request"));
        assert_eq!(inv.options["group"], "db-admins");
        assert_eq!(inv.origin.user, "u1");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(matches!(Incoming::from_json(b"{"), Err(Rejected::Malformed(_))));
        assert!(matches!(
            Incoming::from_json(br#"{"type":3,"id":"1","token":"t","user":{"id":"u"}}"#),
            Err(Rejected::Malformed(_))
        ));
        assert_eq!(
            Incoming::from_json(br#"{"type":42,"id":"1","token":"t","user":{"id":"u"},"data":{}}"#),
            Err(Rejected::UnknownType(42))
        );
        assert_eq!(Incoming::from_json(br#"{"type":1}"#), Ok(Incoming::Ping));
    }
}
