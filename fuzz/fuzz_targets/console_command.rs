//! The admin console's command parser on arbitrary text. Invariants checked: never a panic;
//! case-insensitive and indifferent to surrounding whitespace and trailing semicolons (the same
//! command after changing those); an unknown command is reported as the trimmed text typed, a
//! part of the input; a PAUSE argument is a part of the input too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadow_alter::proxy::ConsoleCommand as Command;

fn within(outer: &str, inner: &str) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
}

/// The command's kind, ignoring the text it carries.
fn kind(c: &Command<'_>) -> u8 {
    match c {
        Command::Empty => 0,
        Command::ShowClients => 1,
        Command::ShowStatus => 2,
        Command::ShowStats => 3,
        Command::Pause(None) => 4,
        Command::Pause(Some(_)) => 5,
        Command::Resume => 6,
        Command::Swapped => 7,
        Command::Unknown(_) => 8,
        Command::ShowRoutes => 9,
        Command::Route(_) => 10,
        Command::Unroute(_) => 11,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let c = Command::parse(text);
    match c {
        Command::Unknown(t) => {
            assert!(within(text, t));
            assert_eq!(t, t.trim());
            assert!(!t.is_empty());
        }
        Command::Pause(Some(arg)) | Command::Route(arg) | Command::Unroute(arg) => {
            assert!(within(text, arg))
        }
        _ => {}
    }
    let upper = text.to_ascii_uppercase();
    let lower = text.to_ascii_lowercase();
    assert_eq!(kind(&Command::parse(&upper)), kind(&c));
    assert_eq!(kind(&Command::parse(&lower)), kind(&c));
    let padded = format!(" \t{text}\n ;;");
    assert_eq!(kind(&Command::parse(&padded)), kind(&c), "{padded:?}");
});
