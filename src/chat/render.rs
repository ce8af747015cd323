//! Every word jitbot's chat layer says on its own (the engine's replies and
//! notices come worded from the engine, in plain words with a [`Tone`]):
//! approval cards, buttons, the deny form, the answers of the shared
//! inbound route, and how each platform marks a notice's tone. Shared by
//! the chat adapters so every platform says the same thing; each adapter
//! adds only its own markup and limits.

use crate::messages::{ApprovalCard, Notice, Tone};
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
    headline_marked(card, |s| s.to_string())
}

/// The headline with each fact (requester, group, duration) passed through
/// `mark`: a platform's emphasis and escaping.
pub fn headline_marked(card: &ApprovalCard, mark: impl Fn(&str) -> String) -> String {
    let kind = if card.extension {
        "an extension of"
    } else {
        "membership in"
    };
    format!(
        "{} requests {kind} {} for {}",
        mark(card.requester.as_str()),
        mark(card.group.as_str()),
        mark(&card.duration)
    )
}

/// The card in one line, for notifications and screen readers: "alice
/// requests db-admins for 2h (pending: 0 of 1 approvals): fixing replication".
pub fn card_summary(card: &ApprovalCard) -> String {
    format!(
        "{} requests {} for {} ({}): {}",
        card.requester, card.group, card.duration, card.status, card.reason
    )
}

/// The facts a card shows below its headline (the headline already names
/// requester, group and duration).
pub fn detail_fields(card: &ApprovalCard) -> Vec<(&'static str, String)> {
    fields(card).into_iter().skip(3).collect()
}

/// The answer to a click on a button that stands for nothing here.
pub const BUTTON_DOES_NOTHING: &str = "That button does nothing here.";
/// The answer to an interaction delivered again (a platform's retry or a replay).
pub const ALREADY_HANDLED: &str = "That interaction was already handled; nothing was done again.";
/// The answer when a command's work failed unexpectedly.
pub const FAILED_TO_RUN: &str = "jitbot failed to run that; tell your jitbot admins.";
/// A deny submitted without a reason.
pub const REASON_REQUIRED: &str = "Say why you deny it: a reason is required.";
/// The deny form: its title, the reason box's label and placeholder, its button.
pub const DENY_TITLE: &str = "Deny request";
pub const REASON_LABEL: &str = "Reason";
pub const DENY_PLACEHOLDER: &str = "Not during the change freeze";
pub const DENY_SUBMIT: &str = "Deny";

/// The deny form's question.
pub fn deny_prompt(request: &str) -> String {
    format!("Why is {request} denied? The requester will see this.")
}

/// The answer to someone whose chat profile has no email to find them by.
pub fn no_profile_email(platform: &str) -> String {
    format!("Your {platform} profile shows no email address, so jitbot cannot find your directory account.")
}

/// The answer when the platform could not say who someone is.
pub fn lookup_failed(platform: &str, error: &dyn std::fmt::Display) -> String {
    format!("jitbot cannot look you up in {platform} right now ({error}); try again in a minute.")
}

/// The answer to a chat user no config or directory entry links to anyone.
pub fn unknown_chat_user(platform: &str, id: &str) -> String {
    format!("jitbot does not know who {platform} user {id} is; ask your jitbot admins to link your account")
}

/// The answer when a platform would not open the deny form.
pub fn deny_form_failed(platform: &str, error: &dyn std::fmt::Display, request: &str) -> String {
    format!("{platform} would not open the form ({error}); use `/jit deny {request} <reason>`.")
}

/// "Access request r-1" (or "Extension request r-1"): what a card is.
pub fn card_title(card: &ApprovalCard) -> String {
    let kind = if card.extension { "Extension" } else { "Access" };
    format!("{kind} request {}", card.request)
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
    if !card.recipients.pending.is_empty() {
        let names: Vec<&str> = card.recipients.pending.iter().map(|u| u.as_str()).collect();
        fields.push(("DM not sent yet", names.join(", ")));
    }
    if !card.recipients.unlisted.is_empty() {
        fields.push((
            "Approver groups not listed yet",
            card.recipients.unlisted.join(", "),
        ));
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

/// How a platform marks a notice's [`Tone`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoration {
    /// Slack's emoji shortcodes (`:key:`), which Slack draws.
    SlackEmoji,
    /// Nothing: the words alone (Discord would show a shortcode as typed,
    /// and many machines running the web console lack an emoji font).
    Plain,
}

/// The Slack emoji that marks `tone`, if any.
pub fn slack_emoji(tone: Tone) -> Option<&'static str> {
    match tone {
        Tone::Plain => None,
        Tone::Alarm => Some(":rotating_light:"),
        Tone::Warning => Some(":warning:"),
        Tone::Granted => Some(":key:"),
        Tone::Locked => Some(":lock:"),
        Tone::Anchor => Some(":anchor:"),
    }
}

/// A notice's text as a platform shows it: its tone's mark, then the words.
pub fn notice_text(notice: &Notice, decoration: Decoration) -> String {
    let mark = match decoration {
        Decoration::SlackEmoji => slack_emoji(notice.tone),
        Decoration::Plain => None,
    };
    match mark {
        Some(mark) => format!("{mark} {}", notice.text),
        None => notice.text.clone(),
    }
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
        c.recipients.pending = vec![UserId::new("bob")];
        c.recipients.unlisted = vec!["cn=security".into()];
        let text = card_text(&c);
        assert!(text.contains("DM not sent yet: bob"), "{text}");
        assert!(
            text.contains("Approver groups not listed yet: cn=security"),
            "{text}"
        );
    }

    #[test]
    fn only_slack_marks_a_tone_and_plain_notices_are_left_alone() {
        let mut n = Notice {
            to: crate::messages::Audience::Alert,
            text: "alice now has `db` until 10:00 (lease l-1).".into(),
            buttons: Vec::new(),
            tone: Tone::Granted,
        };
        assert_eq!(
            notice_text(&n, Decoration::SlackEmoji),
            ":key: alice now has `db` until 10:00 (lease l-1)."
        );
        assert_eq!(notice_text(&n, Decoration::Plain), n.text);
        n.tone = Tone::Plain;
        assert_eq!(notice_text(&n, Decoration::SlackEmoji), n.text);
    }

    #[test]
    fn clip_keeps_short_text_and_marks_cuts() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("ééééé", 2).chars().count(), 2);
    }
}
