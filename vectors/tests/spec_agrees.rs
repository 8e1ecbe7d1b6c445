//! The specification and the code agree: `spec/03-messages.md` has a section for every message
//! type, headed with its code and name, whose field table lists exactly the code's fields in wire
//! order; and the constants spec/02 states are the code's.

use std::collections::BTreeMap;

use ntm_wire::MessageType;
use vectors::samples;

fn spec(name: &str) -> String {
    let p = vectors::dir().join("../spec").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Field names in each `### 0xNN NAME` section's first table, in order.
fn spec_fields(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_table = false;
    let mut done = false;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### 0x") {
            current = Some(h.trim().to_string());
            out.insert(h.trim().to_string(), Vec::new());
            in_table = false;
            done = false;
            continue;
        }
        let Some(sec) = &current else { continue };
        if done {
            continue;
        }
        if line.starts_with("| field |") {
            in_table = true;
            continue;
        }
        if in_table {
            if line.starts_with("|---") || line.starts_with("| ---") {
                continue;
            }
            if let Some(rest) = line.strip_prefix("| ") {
                let name = rest
                    .split('|')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('`');
                out.get_mut(sec).expect("section").push(name.to_string());
            } else {
                in_table = false;
                done = true;
            }
        }
    }
    out
}

#[test]
fn every_message_has_a_spec_section_listing_its_fields_in_wire_order() {
    let sections = spec_fields(&spec("03-messages.md"));
    let mut seen = Vec::new();
    for s in samples::all() {
        let t = s.message.msg_type();
        if seen.contains(&t) {
            continue;
        }
        seen.push(t);
        let heading = format!("{:02x} {}", t.to_u8(), t.name());
        let fields = sections
            .get(&heading)
            .unwrap_or_else(|| panic!("spec/03-messages.md has no section '### 0x{heading}'"));
        let code: Vec<String> = s
            .message
            .fields()
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(
            fields,
            &code,
            "{}: spec fields differ from the code's",
            t.name()
        );
    }
    assert_eq!(
        seen.len(),
        MessageType::ALL.len(),
        "samples miss a message type"
    );
    assert_eq!(
        sections.len(),
        MessageType::ALL.len(),
        "spec has sections for unknown types"
    );
}

#[test]
fn the_constants_in_the_wire_format_chapter_are_the_codes() {
    let text = spec("02-wire-format.md");
    for (what, value) in [
        ("24-byte header", ntm_wire::HEADER_LEN == 24),
        ("**1232 bytes**", ntm_wire::MAX_SIGNALING_LEN == 1232),
        (
            "**Overhead: 32 bytes** per packet",
            ntm_wire::DATA_OVERHEAD == 32,
        ),
        ("= 1420", ntm_wire::data::VIRTUAL_MTU == 1420),
        ("**8192**", ntm_wire::ReplayWindow::SIZE == 8192),
    ] {
        let in_spec = text.contains(what) || spec("04-crypto.md").contains(what);
        assert!(in_spec && value, "spec and code disagree on {what}");
    }
}
