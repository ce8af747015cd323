//! Block Kit rendering: approval cards, notices and the two modals (request
//! and deny reason). Pure functions from jitbot's view model to Slack JSON.

use crate::chat::render;
use crate::ports::{ApprovalCard, Notice};
use jitbot_core::command::Action;
use slack_morphism::prelude::*;

/// `callback_id` of the modal that asks for group, duration and reason.
pub const REQUEST_MODAL: &str = "jit:request";
/// `callback_id` of the modal that asks for a denial's reason.
pub const DENY_MODAL: &str = "jit:deny";
/// Block and action ids of the modal inputs.
pub const GROUP_INPUT: &str = "group";
pub const DURATION_INPUT: &str = "duration";
pub const REASON_INPUT: &str = "reason";

/// Escapes the three characters Slack's mrkdwn treats as markup, so that a
/// reason cannot ping `<!channel>` or forge a link.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn mrkdwn(text: String) -> SlackBlockText {
    SlackBlockMarkDownText::new(text).into()
}

fn plain(text: &str) -> SlackBlockPlainTextOnly {
    SlackBlockPlainText::new(text.to_string()).into()
}

fn style(action: &Action) -> Option<SlackBlockButtonStyle> {
    match action {
        Action::Approve(_) => Some(SlackBlockButtonStyle::Primary),
        Action::Deny(_) => Some(SlackBlockButtonStyle::Danger),
        _ => None,
    }
}

fn target(action: &Action) -> &str {
    match action {
        Action::Approve(t)
        | Action::Deny(t)
        | Action::Extend(t)
        | Action::Release(t)
        | Action::Acknowledge(t) => t,
    }
}

/// Buttons whose `action_id` is the platform-neutral [`Action::id`].
fn buttons(actions: &[Action]) -> Option<SlackBlock> {
    if actions.is_empty() {
        return None;
    }
    let elements = actions
        .iter()
        .map(|a| {
            let mut button = SlackBlockButtonElement::new(plain(render::button_label(a)))
                .with_action_id(a.id().into())
                .with_value(target(a).to_string());
            if let Some(style) = style(a) {
                button = button.with_style(style);
            }
            SlackActionBlockElement::Button(button)
        })
        .collect();
    Some(SlackActionsBlock::new(elements).into())
}

/// The approval card: who wants what for how long and why, the approvals
/// so far, the status, and Approve/Deny only while the request is open.
pub fn approval_card(card: &ApprovalCard) -> SlackMessageContent {
    let headline = render::headline_marked(card, |fact| format!("*{}*", escape(fact)));
    let fields = render::detail_fields(card)
        .into_iter()
        .map(|(label, value)| match label {
            "Request" => mrkdwn(format!("*{label}*\n`{}`", escape(&value))),
            _ => mrkdwn(format!("*{label}*\n{}", escape(&value))),
        })
        .collect();
    let mut blocks: Vec<SlackBlock> = vec![
        SlackSectionBlock::new().with_text(mrkdwn(headline)).into(),
        SlackSectionBlock::new().with_fields(fields).into(),
    ];
    if let Some(b) = buttons(&card.buttons()) {
        blocks.push(b);
    }
    // The top-level text is mrkdwn too (notifications, screen readers):
    // escaped like the blocks, so a reason cannot ping `<!channel>`.
    let fallback = escape(&render::card_summary(card));
    SlackMessageContent::new().with_text(fallback).with_blocks(blocks)
}

/// A notice: its text, and its buttons when it has any.
pub fn notice(notice: &Notice) -> SlackMessageContent {
    let text = escape(&render::notice_text(notice, render::Decoration::SlackEmoji));
    let mut blocks: Vec<SlackBlock> = vec![SlackSectionBlock::new().with_text(mrkdwn(text.clone())).into()];
    if let Some(b) = buttons(&notice.buttons) {
        blocks.push(b);
    }
    SlackMessageContent::new().with_text(text).with_blocks(blocks)
}

fn input(block_id: &str, title: &str, placeholder: &str, multiline: bool, optional: bool) -> SlackBlock {
    let element = SlackBlockPlainTextInputElement::new()
        .with_action_id(block_id.into())
        .with_placeholder(plain(placeholder))
        .with_multiline(multiline);
    SlackInputBlock::new(plain(title), SlackInputBlockElement::PlainTextInput(element))
        .with_block_id(block_id.into())
        .with_optional(optional)
        .into()
}

/// The modal opened by `/jit request` without arguments.
pub fn request_modal(private_metadata: String) -> SlackView {
    SlackView::Modal(
        SlackModalView::new(
            plain("Request access"),
            vec![
                input(GROUP_INPUT, "Group", "db-admins", false, false),
                input(
                    DURATION_INPUT,
                    "Duration",
                    "2h (empty: the group's default)",
                    false,
                    true,
                ),
                input(REASON_INPUT, "Reason", "What are you going to do?", true, false),
            ],
        )
        .with_submit(plain("Request"))
        .with_close(plain("Cancel"))
        .with_callback_id(REQUEST_MODAL.into())
        .with_private_metadata(private_metadata),
    )
}

/// The modal opened by a Deny click: the reason is required.
pub fn deny_modal(request: &str, private_metadata: String) -> SlackView {
    SlackView::Modal(
        SlackModalView::new(
            plain(render::DENY_TITLE),
            vec![
                SlackSectionBlock::new()
                    .with_text(mrkdwn(render::deny_prompt(&format!("`{}`", escape(request)))))
                    .into(),
                input(
                    REASON_INPUT,
                    render::REASON_LABEL,
                    render::DENY_PLACEHOLDER,
                    true,
                    false,
                ),
            ],
        )
        .with_submit(plain(render::DENY_SUBMIT))
        .with_close(plain("Cancel"))
        .with_callback_id(DENY_MODAL.into())
        .with_private_metadata(private_metadata),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitbot_core::{GroupName, RequestId, UserId};

    fn card(open: bool) -> ApprovalCard {
        ApprovalCard {
            request: RequestId::new("r-1"),
            group: GroupName::new("db-admins"),
            requester: UserId::new("alice"),
            duration: "2h".into(),
            reason: "fix <!channel> & more".into(),
            extension: false,
            approvals: vec![UserId::new("bob")],
            needed: 2,
            status: "pending".into(),
            open,
            recipients: Default::default(),
        }
    }

    #[test]
    fn open_card_has_buttons_with_action_ids_and_escaped_reason() {
        let json = serde_json::to_string(&approval_card(&card(true))).unwrap();
        assert!(json.contains("\"action_id\":\"jit:approve:r-1\""), "{json}");
        assert!(json.contains("\"action_id\":\"jit:deny:r-1\""), "{json}");
        assert!(json.contains("1 of 2"), "{json}");
        assert!(json.contains("&lt;!channel&gt; &amp; more"), "{json}");
        assert!(!json.contains("<!channel>\""), "{json}");
    }

    #[test]
    fn top_level_text_is_escaped_too() {
        for content in [
            approval_card(&card(true)),
            notice(&Notice {
                to: crate::ports::Audience::Alert,
                text: "fix <!channel> & <@U123> <https://evil|x>".into(),
                buttons: vec![],
                tone: Default::default(),
            }),
        ] {
            let text = content.text.clone().unwrap();
            assert!(!text.contains('<') && !text.contains('>'), "{text}");
            assert!(text.contains("&lt;!channel&gt;"), "{text}");
            assert!(text.contains(" &amp; "), "{text}");
        }
    }

    #[test]
    fn decided_card_has_no_buttons() {
        let json = serde_json::to_string(&approval_card(&card(false))).unwrap();
        assert!(!json.contains("action_id"), "{json}");
        assert!(!json.contains("\"actions\""), "{json}");
    }

    #[test]
    fn modals_carry_callback_ids_and_metadata() {
        let json = serde_json::to_string(&deny_modal("r-1", "{\"request\":\"r-1\"}".into())).unwrap();
        assert!(json.contains("\"callback_id\":\"jit:deny\""), "{json}");
        assert!(json.contains("private_metadata"), "{json}");
        let json = serde_json::to_string(&request_modal(String::new())).unwrap();
        assert!(json.contains("\"callback_id\":\"jit:request\""), "{json}");
    }
}
