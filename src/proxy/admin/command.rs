//! The admin console's command language: what a Query's text asks for. Pure; the console runs
//! the result.
//!
//! Invariant: case-insensitive, surrounding whitespace and trailing semicolons (with any
//! whitespace between them) ignored; anything
//! not recognised is `Unknown` with the text as typed (trimmed), never an error here.

/// One console command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// An empty query (answered with EmptyQueryResponse).
    Empty,
    ShowClients,
    ShowStatus,
    ShowStats,
    /// PAUSE, with its deadline argument as typed (quotes removed), if any.
    Pause(Option<&'a str>),
    Resume,
    /// A table was swapped outside a PAUSE/RESUME: sessions re-check their statements.
    Swapped,
    ShowRoutes,
    /// `ROUTE param=value:schema` (the argument as typed, quotes removed).
    Route(&'a str),
    /// `UNROUTE param=value`.
    Unroute(&'a str),
    /// Anything else: the trimmed text.
    Unknown(&'a str),
}

impl<'a> Command<'a> {
    pub fn parse(sql: &'a str) -> Command<'a> {
        let text = sql
            .trim_end_matches(|c: char| c == ';' || c.is_whitespace())
            .trim_start();
        let mut words = text.split_whitespace();
        let (first, second, third) = (words.next(), words.next(), words.next());
        let is = |w: Option<&str>, k: &str| w.is_some_and(|w| w.eq_ignore_ascii_case(k));
        match (first, second, third) {
            (None, _, _) => Command::Empty,
            (w, s, None) if is(w, "SHOW") && is(s, "CLIENTS") => Command::ShowClients,
            (w, s, None) if is(w, "SHOW") && is(s, "STATUS") => Command::ShowStatus,
            (w, s, None) if is(w, "SHOW") && is(s, "STATS") => Command::ShowStats,
            (w, None, _) if is(w, "PAUSE") => Command::Pause(None),
            (w, Some(arg), None) if is(w, "PAUSE") => Command::Pause(Some(arg.trim_matches('\''))),
            (w, None, _) if is(w, "RESUME") => Command::Resume,
            (w, None, _) if is(w, "SWAPPED") => Command::Swapped,
            (w, s, None) if is(w, "SHOW") && is(s, "ROUTES") => Command::ShowRoutes,
            (w, Some(arg), None) if is(w, "ROUTE") => Command::Route(arg.trim_matches('\'')),
            (w, Some(arg), None) if is(w, "UNROUTE") => Command::Unroute(arg.trim_matches('\'')),
            _ => Command::Unknown(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::admin::command::*;

    #[test]
    fn commands_ignore_case_spacing_and_semicolons() {
        assert_eq!(Command::parse("SHOW CLIENTS"), Command::ShowClients);
        assert_eq!(Command::parse("  show   clients ;"), Command::ShowClients);
        assert_eq!(Command::parse("Show Status;;"), Command::ShowStatus);
        assert_eq!(Command::parse("resume"), Command::Resume);
        assert_eq!(Command::parse("RESUME;"), Command::Resume);
        assert_eq!(Command::parse("\tPAUSE\n"), Command::Pause(None));
        assert_eq!(Command::parse("swapped;"), Command::Swapped);
        assert_eq!(Command::parse("show stats"), Command::ShowStats);
        assert_eq!(Command::parse("show routes;"), Command::ShowRoutes);
        assert_eq!(
            Command::parse("ROUTE 'application_name=old:v1'"),
            Command::Route("application_name=old:v1")
        );
        assert_eq!(
            Command::parse("unroute user=batch"),
            Command::Unroute("user=batch")
        );
    }

    #[test]
    fn pause_takes_one_deadline_quoted_or_not() {
        assert_eq!(Command::parse("PAUSE 500ms"), Command::Pause(Some("500ms")));
        assert_eq!(Command::parse("pause '5s';"), Command::Pause(Some("5s")));
        // the argument keeps its case (the duration parser decides)
        assert_eq!(Command::parse("PAUSE 1M"), Command::Pause(Some("1M")));
        assert_eq!(
            Command::parse("PAUSE 1s 2s"),
            Command::Unknown("PAUSE 1s 2s")
        );
    }

    #[test]
    fn empty_and_unknown() {
        assert_eq!(Command::parse(""), Command::Empty);
        assert_eq!(Command::parse(" ; "), Command::Empty);
        // found by fuzzing: semicolons with whitespace between them are all trailing
        assert_eq!(Command::parse(";\n\n\n"), Command::Empty);
        assert_eq!(Command::parse("PAUSE ;\n ;;"), Command::Pause(None));
        assert_eq!(Command::parse("resume ; ;"), Command::Resume);
        assert_eq!(Command::parse("SELECT 1;"), Command::Unknown("SELECT 1"));
        assert_eq!(Command::parse("SHOW"), Command::Unknown("SHOW"));
        assert_eq!(
            Command::parse("SHOW CLIENTS now"),
            Command::Unknown("SHOW CLIENTS now")
        );
        assert_eq!(Command::parse("RESUME all"), Command::Unknown("RESUME all"));
    }
}
