//! Platform-neutral wording of approval cards and buttons, shared by the chat
//! adapters so every platform says the same thing; each adapter adds only its
//! own markup and limits.

use crate::ports::ApprovalCard;
use jitbot_core::command::Action;

/// The label of a button, the same on every platform.
pub fn button_label(action: &Action) -> &'static str {
    match action {
        Action::Approve(_) => "Approve",
        Action::Deny(_) => "Deny",
        Action::Extend(_) => "Extend",
        Action::Release(_) => "Release now",
        Action::Acknowledge(_) => "Acknowledge",
    }
}

/// "alice requests membership in db-admins for 2h" (or an extension of it).
pub fn headline(card: &ApprovalCard) -> String {
    let kind = if card.extension {
        "an extension of"
    } else {
        "membership in"
    };
    format!(
        "{} requests {kind} {} for {}",
        card.requester, card.group, card.duration
    )
}

/// "1 of 2".
pub fn approvals(card: &ApprovalCard) -> String {
    format!("{} of {}", card.approvals.len(), card.needed)
}

/// The card's labelled facts, in display order.
pub fn fields(card: &ApprovalCard) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("Requester", card.requester.to_string()),
        ("Group", card.group.to_string()),
        ("Duration", card.duration.clone()),
        ("Reason", card.reason.clone()),
        ("Approvals", approvals(card)),
        ("Status", card.status.clone()),
        ("Request", card.request.to_string()),
    ];
    if !card.recipients.unreachable.is_empty() {
        let names: Vec<&str> = card.recipients.unreachable.iter().map(|u| u.as_str()).collect();
        fields.push(("Could not reach by DM", names.join(", ")));
    }
    fields
}

/// The whole card as plain text, for fallbacks and text-only surfaces.
pub fn card_text(card: &ApprovalCard) -> String {
    let mut lines = vec![headline(card)];
    lines.extend(
        fields(card)
            .into_iter()
            .skip(3)
            .map(|(label, value)| format!("{label}: {value}")),
    );
    lines.join("\n")
}

/// Cuts `text` to at most `max` characters, ending with `…` when cut, so a
/// long reason never makes a platform refuse the whole message.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitbot_core::{GroupName, RequestId, UserId};

    fn card() -> ApprovalCard {
        ApprovalCard {
            request: RequestId::new("r-1"),
            group: GroupName::new("db-admins"),
            requester: UserId::new("alice"),
            duration: "2h".into(),
            reason: "fixing replication".into(),
            extension: false,
            approvals: vec![UserId::new("bob")],
            needed: 2,
            status: "pending: 1 of 2 approvals".into(),
            open: true,
            recipients: Default::default(),
        }
    }

    #[test]
    fn card_reads_the_same_everywhere() {
        let c = card();
        assert_eq!(headline(&c), "alice requests membership in db-admins for 2h");
        assert_eq!(approvals(&c), "1 of 2");
        let text = card_text(&c);
        assert!(text.contains("Reason: fixing replication"), "{text}");
        assert!(text.contains("Request: r-1"), "{text}");
        assert!(!text.contains("DM"), "{text}");
    }

    #[test]
    fn unreachable_approvers_are_listed() {
        let mut c = card();
        c.recipients.unreachable = vec![UserId::new("carol"), UserId::new("dave")];
        let text = card_text(&c);
        assert!(text.contains("Could not reach by DM: carol, dave"), "{text}");
    }

    #[test]
    fn clip_keeps_short_text_and_marks_cuts() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("ééééé", 2).chars().count(), 2);
    }
}
