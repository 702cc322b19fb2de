//! The SQL-level statements that change which prepared statements a session holds, recognised
//! in a simple Query's text: `PREPARE name [(types)] AS ...`, `DEALLOCATE [PREPARE] name | ALL`
//! and `DISCARD ALL`. SQL `PREPARE` shares its namespace with the protocol's Parse.
//!
//! Invariant: pure and conservative: a text is recognised only when it is exactly one such
//! statement (no `;` before its end, so no second statement); anything else is `None`, and the
//! session simply does not track it. Names are returned as the server stores them (unquoted
//! identifiers folded to lower case) together with the identifier exactly as typed.

/// What a Query does to the session's prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlOp<'a> {
    /// `PREPARE`: the server's name for it, the name as typed.
    Prepare { name: Vec<u8>, ident: &'a [u8] },
    /// `DEALLOCATE name` (the server's name).
    Deallocate(Vec<u8>),
    /// `DEALLOCATE ALL` or `DISCARD ALL`: every prepared statement is gone.
    All,
}

fn skip_ws(t: &[u8]) -> &[u8] {
    let n = t.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &t[n..]
}

/// `t` starts with keyword `k` (any case) followed by a non-identifier byte or the end.
fn keyword<'a>(t: &'a [u8], k: &str) -> Option<&'a [u8]> {
    let head = t.get(..k.len())?;
    let ident = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'$';
    (head.eq_ignore_ascii_case(k.as_bytes()) && !t.get(k.len()).is_some_and(ident))
        .then(|| &t[k.len()..])
}

/// An identifier at the front of `t`: (server name, as typed, rest).
fn identifier(t: &[u8]) -> Option<(Vec<u8>, &[u8], &[u8])> {
    if t.first() == Some(&b'"') {
        let mut name = Vec::new();
        let mut i = 1;
        loop {
            match (t.get(i), t.get(i + 1)) {
                (Some(b'"'), Some(b'"')) => {
                    name.push(b'"');
                    i += 2;
                }
                (Some(b'"'), _) => break,
                (Some(&c), _) => {
                    name.push(c);
                    i += 1;
                }
                (None, _) => return None,
            }
        }
        (!name.is_empty()).then(|| (name, &t[..=i], &t[i + 1..]))
    } else {
        let first = *t.first()?;
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return None;
        }
        let n = t
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'$')
            .count();
        Some((t[..n].to_ascii_lowercase(), &t[..n], &t[n..]))
    }
}

/// Only whitespace and semicolons remain.
fn at_end(t: &[u8]) -> bool {
    t.iter().all(|c| c.is_ascii_whitespace() || *c == b';')
}

/// Recognise one of the statements of the module comment.
pub fn classify(text: &[u8]) -> Option<SqlOp<'_>> {
    let t = skip_ws(text);
    if let Some(rest) = keyword(t, "prepare") {
        let (name, ident, tail) = identifier(skip_ws(rest))?;
        // PREPARE TRANSACTION 'gid' is two-phase commit, not a statement
        if name == b"transaction" && ident.len() == name.len() {
            return None;
        }
        // exactly one statement: no `;` before the end of the text
        let end = tail.len()
            - tail
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_whitespace() || **c == b';')
                .count();
        if tail[..end].contains(&b';') {
            return None;
        }
        return Some(SqlOp::Prepare { name, ident });
    }
    if let Some(rest) = keyword(t, "deallocate") {
        let rest = skip_ws(rest);
        let rest = keyword(rest, "prepare").map(skip_ws).unwrap_or(rest);
        if let Some(tail) = keyword(rest, "all") {
            return at_end(tail).then_some(SqlOp::All);
        }
        let (name, _, tail) = identifier(rest)?;
        return at_end(tail).then_some(SqlOp::Deallocate(name));
    }
    let rest = keyword(t, "discard")?;
    let tail = keyword(skip_ws(rest), "all")?;
    at_end(tail).then_some(SqlOp::All)
}

#[cfg(test)]
mod tests {
    use crate::proxy::reprepare::sqltext::*;

    fn prepared(t: &str) -> Option<(String, String)> {
        match classify(t.as_bytes()) {
            Some(SqlOp::Prepare { name, ident }) => Some((
                String::from_utf8_lossy(&name).into(),
                String::from_utf8_lossy(ident).into(),
            )),
            _ => None,
        }
    }

    #[test]
    fn prepare_names_fold_like_the_server() {
        assert_eq!(
            prepared("PREPARE Q1 AS SELECT * FROM t"),
            Some(("q1".into(), "Q1".into()))
        );
        assert_eq!(
            prepared(r#"  prepare "My ""Q""" (int) AS SELECT $1;"#),
            Some((r#"My "Q""#.into(), r#""My ""Q""""#.into()))
        );
        assert_eq!(
            prepared("prepare q(int) as select * from t where id = $1;\n"),
            Some(("q".into(), "q".into()))
        );
    }

    #[test]
    fn not_a_single_prepare() {
        assert_eq!(prepared("PREPARE TRANSACTION 'x'"), None);
        assert_eq!(prepared("PREPARE q AS SELECT 1; SELECT 2"), None);
        assert_eq!(prepared("PREPAREq AS SELECT 1"), None);
        assert_eq!(prepared("SELECT 'PREPARE q AS SELECT 1'"), None);
        assert_eq!(classify(b"EXECUTE q"), None);
    }

    #[test]
    fn deallocate_and_discard() {
        assert_eq!(
            classify(b"DEALLOCATE Q1;"),
            Some(SqlOp::Deallocate(b"q1".to_vec()))
        );
        assert_eq!(
            classify(b"deallocate prepare \"Q\""),
            Some(SqlOp::Deallocate(b"Q".to_vec()))
        );
        assert_eq!(classify(b"DEALLOCATE ALL"), Some(SqlOp::All));
        assert_eq!(classify(b"discard all;"), Some(SqlOp::All));
        assert_eq!(classify(b"DISCARD PLANS"), None);
        assert_eq!(classify(b"DEALLOCATE q; SELECT 1"), None);
    }
}
