//! Batching: changes are gathered into a *window* in which every key (old and new) appears at
//! most once. Changes to different rows commute, so a window is applied as one array statement
//! per kind (delete, update per unchanged-TOAST mask, insert), whatever the interleaving in the
//! stream. A key seen again closes the window first, so changes to one row keep their order.
//! Pure: the window only collects rows; the applier sends them.

use std::collections::HashSet;

use super::statements::StmtKey;

/// A key's values as text (NULL as None).
pub(super) type KeyValue = Vec<Option<String>>;

/// Rows in one window, at most.
pub(super) const WINDOW_ROWS: usize = 1_000;
/// Keys named in a message about a statement, at most.
const KEYS_SHOWN: usize = 3;

/// Rows of one statement kind in the window; `S` is the prepared statement.
pub(super) struct Group<S> {
    pub key: StmtKey,
    pub stmt: S,
    /// Parameters column-major: one text array per statement parameter.
    pub columns: Vec<Vec<Option<String>>>,
    pub rows: usize,
    /// The first few keys, for messages.
    keys: Vec<String>,
}

impl<S> Group<S> {
    /// The keys of its rows, for a message: the first few and how many more.
    pub fn describe_keys(&self) -> String {
        if self.rows > self.keys.len() {
            format!(
                "{} and {} more",
                self.keys.join(", "),
                self.rows - self.keys.len()
            )
        } else {
            self.keys.join(", ")
        }
    }
}

pub(super) struct Window<S> {
    keys: HashSet<KeyValue>,
    groups: Vec<Group<S>>,
    rows: usize,
}

impl<S> Default for Window<S> {
    fn default() -> Self {
        Window {
            keys: HashSet::new(),
            groups: Vec::new(),
            rows: 0,
        }
    }
}

impl<S> Window<S> {
    /// Whether a change touching these keys may join: none of them is in the window yet (a
    /// change to the same row must come after the ones before it), and there is room.
    pub fn admits(&self, touched: &[KeyValue]) -> bool {
        self.rows < WINDOW_ROWS && !touched.iter().any(|k| self.keys.contains(k))
    }

    /// Add a row of statement kind `key` (prepared as `stmt` when the kind is new here).
    pub fn add(
        &mut self,
        key: StmtKey,
        stmt: S,
        params: Vec<Option<String>>,
        desc: String,
        touched: Vec<KeyValue>,
    ) {
        let i = match self.groups.iter().position(|g| g.key == key) {
            Some(i) => i,
            None => {
                self.groups.push(Group {
                    key,
                    stmt,
                    columns: vec![Vec::new(); params.len()],
                    rows: 0,
                    keys: Vec::new(),
                });
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[i];
        for (col, v) in group.columns.iter_mut().zip(params) {
            col.push(v);
        }
        group.rows += 1;
        if group.keys.len() < KEYS_SHOWN {
            group.keys.push(desc);
        }
        self.rows += 1;
        self.keys.extend(touched);
    }

    /// The groups to send, leaving the window empty.
    pub fn take(&mut self) -> Vec<Group<S>> {
        let w = std::mem::take(self);
        w.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(v: &str) -> KeyValue {
        vec![Some(v.to_string())]
    }

    #[test]
    fn rows_of_one_kind_share_a_statement_column_by_column() {
        let mut w: Window<&str> = Window::default();
        w.add(
            StmtKey::Insert,
            "ins",
            vec![Some("1".into()), Some("a".into())],
            "1".into(),
            vec![k("1")],
        );
        w.add(
            StmtKey::Delete,
            "del",
            vec![Some("2".into())],
            "2".into(),
            vec![k("2")],
        );
        w.add(
            StmtKey::Insert,
            "unused",
            vec![Some("3".into()), None],
            "3".into(),
            vec![k("3")],
        );
        let groups = w.take();
        assert_eq!(groups.len(), 2);
        let ins = &groups[0];
        assert_eq!((ins.stmt, ins.rows), ("ins", 2));
        assert_eq!(
            ins.columns[0],
            vec![Some("1".to_string()), Some("3".to_string())]
        );
        assert_eq!(ins.columns[1], vec![Some("a".to_string()), None]);
        assert_eq!(ins.describe_keys(), "1, 3");
        assert!(w.take().is_empty(), "taking empties the window");
    }

    #[test]
    fn a_key_seen_again_closes_the_window() {
        let mut w: Window<()> = Window::default();
        assert!(w.admits(&[k("1")]));
        w.add(
            StmtKey::Update(vec![false]),
            (),
            vec![Some("1".into())],
            "1".into(),
            vec![k("1"), k("9")],
        );
        // the old and the new key of a moved row are both in the window
        assert!(!w.admits(&[k("9")]));
        assert!(!w.admits(&[k("5"), k("1")]));
        assert!(w.admits(&[k("5")]));
    }

    #[test]
    fn a_full_window_takes_no_more_rows() {
        let mut w: Window<()> = Window::default();
        for i in 0..WINDOW_ROWS {
            let key = k(&i.to_string());
            w.add(
                StmtKey::Insert,
                (),
                vec![Some(i.to_string())],
                i.to_string(),
                vec![key],
            );
        }
        assert!(!w.admits(&[k("new")]));
        let groups = w.take();
        assert_eq!(
            groups[0].describe_keys(),
            format!("0, 1, 2 and {} more", WINDOW_ROWS - 3)
        );
    }
}
