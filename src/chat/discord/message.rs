//! Discord rendering: approval cards as embeds with buttons, notices, the
//! deny-reason modal and interaction answers. Pure functions from jitbot's
//! view model to serenity builders; no I/O.

use crate::chat::render;
use crate::ports::{ApprovalCard, Notice};
use jitbot_core::command::{Action, MAX_REASON_CHARS};
use serde_json::{json, Value};
use serenity::all::{
    ButtonStyle, CreateActionRow, CreateAllowedMentions, CreateButton, CreateEmbed, CreateInputText,
    CreateInteractionResponse, CreateInteractionResponseMessage, CreateMessage, CreateModal, EditMessage,
    InputTextStyle,
};

/// Discord's limit on a message's `content`.
pub const CONTENT_LIMIT: usize = 2000;
/// Discord's limit on an embed field's value.
const FIELD_LIMIT: usize = 1024;
/// Prefix of the deny modal's `custom_id`; the request id follows.
pub const DENY_MODAL_PREFIX: &str = "jit:deny-modal:";
/// `custom_id` of the reason input in the deny modal.
pub const REASON_INPUT: &str = "reason";

const OPEN_COLOUR: u32 = 0xF1C40F;
const DECIDED_COLOUR: u32 = 0x95A5A6;

/// Nobody is pinged by what jitbot writes, whatever a reason contains.
fn no_pings() -> CreateAllowedMentions {
    CreateAllowedMentions::new()
}

/// Buttons whose `custom_id` is the platform-neutral [`Action::id`].
pub fn buttons(actions: &[Action]) -> Vec<CreateActionRow> {
    if actions.is_empty() {
        return Vec::new();
    }
    let row = actions
        .iter()
        .map(|a| {
            let style = match a {
                Action::Approve(_) => ButtonStyle::Success,
                Action::Deny(_) => ButtonStyle::Danger,
                _ => ButtonStyle::Secondary,
            };
            CreateButton::new(a.id())
                .label(render::button_label(a))
                .style(style)
        })
        .collect();
    vec![CreateActionRow::Buttons(row)]
}

/// The card's embed: headline, the facts as fields, yellow while open.
pub fn card_embed(card: &ApprovalCard) -> CreateEmbed {
    let fields = render::fields(card).into_iter().map(|(label, value)| {
        (
            label,
            render::clip(&value, FIELD_LIMIT),
            matches!(label, "Requester" | "Group" | "Duration" | "Approvals"),
        )
    });
    CreateEmbed::new()
        .title(render::clip(&render::headline(card), 256))
        .fields(fields)
        .colour(if card.open { OPEN_COLOUR } else { DECIDED_COLOUR })
}

/// A new approval message in the approvers' channel.
pub fn approval_message(card: &ApprovalCard) -> CreateMessage {
    CreateMessage::new()
        .content(render::card_title(card))
        .embed(card_embed(card))
        .components(buttons(&card.buttons()))
        .allowed_mentions(no_pings())
}

/// The edit of a posted card. Components are always sent, so a decided
/// card's buttons are removed (an empty list clears them).
pub fn approval_edit(card: &ApprovalCard) -> EditMessage {
    EditMessage::new()
        .content(render::card_title(card))
        .embed(card_embed(card))
        .components(buttons(&card.buttons()))
        .allowed_mentions(no_pings())
}

/// A notice: its text, with its buttons when it has any.
pub fn notice_message(notice: &Notice) -> CreateMessage {
    CreateMessage::new()
        .content(render::clip(
            &render::notice_text(notice, render::Decoration::Plain),
            CONTENT_LIMIT,
        ))
        .components(buttons(&notice.buttons))
        .allowed_mentions(no_pings())
}

/// PONG, exactly as Discord documents it.
pub fn pong() -> Value {
    json!({ "type": 1 })
}

/// An answer only the caller sees (type 4, flags 64).
pub fn ephemeral(text: &str) -> CreateInteractionResponse {
    CreateInteractionResponse::Message(
        CreateInteractionResponseMessage::new()
            .content(render::clip(text, CONTENT_LIMIT))
            .ephemeral(true)
            .allowed_mentions(no_pings()),
    )
}

/// "jitbot is thinking", visible only to the caller (type 5, flags 64); the
/// answer follows as an edit of the original response.
pub fn deferred() -> CreateInteractionResponse {
    CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new().ephemeral(true))
}

/// The modal asking an approver why they deny `request` (type 9).
pub fn deny_modal(request: &str) -> CreateInteractionResponse {
    // Discord's modals have no text block: the question is the placeholder.
    let reason = CreateInputText::new(InputTextStyle::Paragraph, render::REASON_LABEL, REASON_INPUT)
        .placeholder(render::clip(&render::deny_prompt("this request"), 100))
        .min_length(1)
        .max_length(MAX_REASON_CHARS as u16)
        .required(true);
    let title = render::clip(&format!("{} {request}", render::DENY_SUBMIT), 45);
    CreateInteractionResponse::Modal(
        CreateModal::new(format!("{DENY_MODAL_PREFIX}{request}"), title)
            .components(vec![CreateActionRow::InputText(reason)]),
    )
}

/// Serializes a response for the HTTP endpoint's body.
pub fn to_json(response: &CreateInteractionResponse) -> Value {
    // Builders serialize to plain JSON maps; failure would be a serenity bug.
    serde_json::to_value(response).unwrap_or_else(|_| json!({ "type": 5, "data": { "flags": 64 } }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitbot_core::{GroupName, RequestId, UserId};

    fn card(open: bool) -> ApprovalCard {
        ApprovalCard {
            request: RequestId::new("r-7"),
            group: GroupName::new("db-admins"),
            requester: UserId::new("alice"),
            duration: "2h".into(),
            reason: "@everyone look".into(),
            extension: false,
            approvals: vec![],
            needed: 2,
            status: "pending".into(),
            open,
            recipients: Default::default(),
        }
    }

    #[test]
    fn open_cards_have_buttons_and_decided_ones_clear_them() {
        let open = serde_json::to_value(approval_message(&card(true))).unwrap();
        let ids: Vec<&str> = open["components"][0]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["jit:approve:r-7", "jit:deny:r-7"]);
        assert_eq!(open["allowed_mentions"]["parse"], json!([]));
        let decided = serde_json::to_value(approval_edit(&card(false))).unwrap();
        assert_eq!(decided["components"], json!([]));
    }

    #[test]
    fn answers_are_ephemeral() {
        let v = to_json(&ephemeral("hi"));
        assert_eq!(v["type"], 4);
        assert_eq!(v["data"]["flags"], 64);
        let v = to_json(&deferred());
        assert_eq!(
            (v["type"].as_u64(), v["data"]["flags"].as_u64()),
            (Some(5), Some(64))
        );
        let v = to_json(&deny_modal("r-7"));
        assert_eq!(v["type"], 9);
        assert_eq!(v["data"]["custom_id"], "jit:deny-modal:r-7");
    }
}
