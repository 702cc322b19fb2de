//! Decoding of the few message fields re-preparation needs, from whole frames (tag and length
//! included): names in Bind / Describe / Close / Parse, a Bind's result formats, an
//! ErrorResponse's "cached plan must not change result type", and a RowDescription's columns.
//!
//! Invariant: pure and total: a truncated or malformed frame decodes to `None` (or `false`),
//! never a panic; names and SQL text stay bytes (the client's encoding need not be UTF-8).

use bytes::{BufMut, BytesMut};

use crate::wire::frame::{put_cstr, put_frame, Header, Reader};

/// The error the server raises in RevalidateCachedQuery.
const PLAN_CHANGED_CODE: &[u8] = b"0A000";
const PLAN_CHANGED_MESSAGE: &[u8] = b"cached plan must not change result type";
const PLAN_CHANGED_ROUTINE: &[u8] = b"RevalidateCachedQuery";

/// The body of a whole frame, read as message `what`.
fn body<'a>(frame: &'a [u8], what: &'static str) -> Option<Reader<'a>> {
    frame.get(Header::SIZE..).map(|b| Reader::new(b, what))
}

/// Split a C string off the front of `b`.
pub fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

/// `parse` (a whole Parse frame) with its parameter types replaced by `params` (a
/// ParameterDescription body: count and type oids, the same layout).
pub fn with_params(parse: &[u8], params: &[u8]) -> Option<Vec<u8>> {
    let (name, rest) = cstr(parse.get(Header::SIZE..)?)?;
    let (query, _) = cstr(rest)?;
    let mut b = BytesMut::with_capacity(parse.len() + params.len());
    put_frame(&mut b, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, query);
        b.put_slice(params);
    });
    Some(b.to_vec())
}

/// Portal and statement names of a Bind frame.
pub fn bind_names(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut r = body(frame, "Bind")?;
    Some((r.cstr_bytes().ok()?, r.cstr_bytes().ok()?))
}

/// Number of result-column format codes of a Bind frame.
pub fn bind_result_formats(frame: &[u8]) -> Option<i16> {
    let mut r = body(frame, "Bind")?;
    r.cstr_bytes().ok()?;
    r.cstr_bytes().ok()?;
    let nfmt = usize::try_from(r.i16().ok()?).ok()?;
    r.bytes(2 * nfmt).ok()?;
    let nparams = r.i16().ok()?;
    for _ in 0..nparams {
        let len = r.i32().ok()?;
        if len > 0 {
            r.bytes(usize::try_from(len).ok()?).ok()?;
        }
    }
    r.i16().ok()
}

/// Name and SQL text of a Parse frame.
pub fn parse_name_and_text(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut r = body(frame, "Parse")?;
    Some((r.cstr_bytes().ok()?, r.cstr_bytes().ok()?))
}

/// SQL text of a Query frame.
pub fn query_text(frame: &[u8]) -> Option<&[u8]> {
    body(frame, "Query")?.cstr_bytes().ok()
}

/// Kind (`S` statement, `P` portal) and name of a Describe or Close frame.
pub fn target(frame: &[u8]) -> Option<(u8, &[u8])> {
    let mut r = body(frame, "Describe/Close")?;
    Some((r.u8().ok()?, r.cstr_bytes().ok()?))
}

/// Does SQL text mention `prepare` (any case)? Runs on every Query and Parse, so it skips
/// eight bytes at a time until one of them is a `p` or `P`, and compares only there.
pub fn mentions_prepare(text: &[u8]) -> bool {
    const REST: &[u8] = b"repare";
    const LOW: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    const CASE: u64 = u64::from_le_bytes([0x20; 8]);
    const P: u64 = u64::from_le_bytes([b'p'; 8]);
    let here = |i: usize| {
        (text[i] | 0x20) == b'p'
            && text
                .get(i + 1..i + 1 + REST.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(REST))
    };
    let mut chunks = text.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        // a zero byte in `x` is a byte that is 'p' once ASCII case is folded
        let x = (u64::from_le_bytes(word) | CASE) ^ P;
        if x.wrapping_sub(LOW) & !x & HIGH != 0 && (at..at + 8).any(here) {
            return true;
        }
        at += 8;
    }
    (at..text.len()).any(here)
}

/// Is this ErrorResponse frame "cached plan must not change result type"?
pub fn is_plan_changed(frame: &[u8]) -> bool {
    let Some(mut rest) = frame.get(Header::SIZE..) else {
        return false;
    };
    let (mut code, mut msg, mut routine) = (false, false, false);
    while let Some((&k, tail)) = rest.split_first() {
        if k == 0 {
            break;
        }
        let Some((v, next)) = cstr(tail) else {
            return false;
        };
        match k {
            b'C' => code = v == PLAN_CHANGED_CODE,
            b'M' => msg = v == PLAN_CHANGED_MESSAGE,
            b'R' => routine = v == PLAN_CHANGED_ROUTINE,
            _ => {}
        }
        rest = next;
    }
    // the message is translated under lc_messages; the routine name is not
    code && (msg || routine)
}

/// A statement's result shape as the client learned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    NoData,
    /// RowDescription body.
    Rows(Box<[u8]>),
}

impl Shape {
    /// The shape a RowDescription ('T') or NoData ('n') frame describes.
    pub fn of(tag: u8, frame: &[u8]) -> Option<Shape> {
        match tag {
            b'n' => Some(Shape::NoData),
            b'T' => frame.get(Header::SIZE..).map(|b| Shape::Rows(b.into())),
            _ => None,
        }
    }

    /// Bytes this shape keeps in memory.
    pub fn cost(&self) -> usize {
        match self {
            Shape::Rows(b) => b.len(),
            Shape::NoData => 0,
        }
    }

    /// Number of columns, if the description decodes.
    pub fn columns(&self) -> Option<usize> {
        match self {
            Shape::NoData => Some(0),
            Shape::Rows(b) => fields(b).map(|f| f.len()),
        }
    }

    /// Can a client that knows `self` read rows of shape `new` (its columns unchanged, new ones
    /// only appended)?
    pub fn extended_by(&self, new: &Shape) -> bool {
        match (self, new) {
            (Shape::NoData, Shape::NoData) => true,
            (Shape::Rows(o), Shape::Rows(n)) => match (fields(o), fields(n)) {
                (Some(o), Some(n)) => n.len() >= o.len() && o.iter().zip(&n).all(|(a, b)| a == b),
                _ => false,
            },
            _ => false,
        }
    }
}

/// (name, type oid) of each field of a RowDescription body.
pub fn fields(body: &[u8]) -> Option<Vec<(&[u8], u32)>> {
    let mut r = Reader::new(body, "RowDescription");
    let n = usize::try_from(r.i16().ok()?).ok()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.cstr_bytes().ok()?;
        r.bytes(6).ok()?; // table oid, column number
        let oid = r.u32().ok()?;
        r.bytes(8).ok()?; // type size, type modifier, format
        out.push((name, oid));
    }
    Some(out)
}

#[cfg(test)]
pub(super) mod tests {
    use crate::proxy::reprepare::message::*;

    pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    pub fn rowdesc(cols: &[(&str, u32)]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (n, oid) in cols {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
            b.extend_from_slice(&[0, 0, 0, 1, 0, 1]);
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&[0, 4, 255, 255, 255, 255, 0, 0]);
        }
        b
    }

    fn rows(cols: &[(&str, u32)]) -> Shape {
        Shape::Rows(rowdesc(cols).into())
    }

    #[test]
    fn shapes() {
        let old = rows(&[("id", 23), ("v", 25)]);
        let appended = rows(&[("id", 23), ("v", 25), ("w", 25)]);
        let retyped = rows(&[("id", 20), ("v", 25)]);
        let renamed = rows(&[("id", 23), ("x", 25)]);
        let dropped = rows(&[("id", 23)]);
        assert!(old.extended_by(&old));
        assert!(old.extended_by(&appended));
        assert!(!appended.extended_by(&old));
        assert!(!old.extended_by(&retyped));
        assert!(!old.extended_by(&renamed));
        assert!(!old.extended_by(&dropped));
        assert!(!old.extended_by(&Shape::NoData));
        assert!(Shape::NoData.extended_by(&Shape::NoData));
        assert_eq!(appended.columns(), Some(3));
        assert_eq!(Shape::NoData.columns(), Some(0));
    }

    #[test]
    fn truncated_descriptions_do_not_decode() {
        let full = rowdesc(&[("id", 23)]);
        for cut in 0..full.len() {
            assert_eq!(fields(&full[..cut]), None, "cut at {cut}");
        }
        let broken = Shape::Rows(full[..full.len() - 1].into());
        assert_eq!(broken.columns(), None);
        assert!(!broken.extended_by(&broken));
        assert_eq!(
            Shape::of(b'T', &frame(b'T', &full)).unwrap().columns(),
            Some(1)
        );
        assert_eq!(Shape::of(b'n', b"n\0\0\0\x04"), Some(Shape::NoData));
        assert_eq!(Shape::of(b'Z', b"Z\0\0\0\x05I"), None);
    }

    #[test]
    fn recognises_the_error() {
        let e = frame(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0RRevalidateCachedQuery\0\0",
        );
        assert!(is_plan_changed(&e));
        let translated = frame(b'E', b"SFEHLER\0C0A000\0Mx\0RRevalidateCachedQuery\0\0");
        assert!(is_plan_changed(&translated));
        let other = frame(b'E', b"SERROR\0C0A000\0Mnot supported\0\0");
        assert!(!is_plan_changed(&other));
        let other_code = frame(
            b'E',
            b"SERROR\0C42P01\0Mcached plan must not change result type\0\0",
        );
        assert!(!is_plan_changed(&other_code));
        assert!(!is_plan_changed(b"E\0\0"));
        assert!(!is_plan_changed(&frame(b'E', b"C0A000")));
    }

    #[test]
    fn bind_parsing() {
        let mut body = b"p1\0s1\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        let f = frame(b'B', &body);
        assert_eq!(bind_names(&f), Some((&b"p1"[..], &b"s1"[..])));
        assert_eq!(bind_result_formats(&f), Some(2));
        assert_eq!(bind_result_formats(&f[..f.len() - 1]), None);
        assert_eq!(bind_names(b"B\0\0"), None);
        // a parameter longer than the frame
        let mut lying = b"\0s\0\0\0\0\x01".to_vec();
        lying.extend_from_slice(&1000i32.to_be_bytes());
        assert_eq!(bind_result_formats(&frame(b'B', &lying)), None);
    }

    #[test]
    fn names_of_parse_describe_close_and_query() {
        let p = frame(b'P', b"s1\0SELECT \xe9\0\0\0");
        assert_eq!(
            parse_name_and_text(&p),
            Some((&b"s1"[..], &b"SELECT \xe9"[..]))
        );
        assert_eq!(target(&frame(b'D', b"Ss1\0")), Some((b'S', &b"s1"[..])));
        assert_eq!(target(&frame(b'C', b"P\0")), Some((b'P', &b""[..])));
        assert_eq!(target(&frame(b'C', b"S")), None);
        assert_eq!(
            query_text(&frame(b'Q', b"SELECT 1\0")),
            Some(&b"SELECT 1"[..])
        );
        assert_eq!(query_text(&frame(b'Q', b"SELECT 1")), None);
    }

    #[test]
    fn prepare_mentions() {
        assert!(mentions_prepare(b"PREPARE s AS SELECT 1"));
        assert!(mentions_prepare(b"deAllocate x; prepare y as select 1"));
        assert!(!mentions_prepare(b"SELECT * FROM t WHERE id = $1"));
        assert!(mentions_prepare(b"prepare"));
        assert!(mentions_prepare(b"x PrEpArE"));
        assert!(!mentions_prepare(b"prepar"));
        assert!(!mentions_prepare(b"pre pare"));
        assert!(!mentions_prepare(b""));
        // only ASCII letters fold: 0xd0 | 0x20 is not 'p'
        assert!(!mentions_prepare(b"\xd0repare"));
    }

    /// The word-at-a-time scan agrees with the plain definition, wherever the word sits.
    #[test]
    fn prepare_scan_matches_the_definition() {
        let plain = |t: &[u8]| t.windows(7).any(|w| w.eq_ignore_ascii_case(b"prepare"));
        let alphabet = b"pPrReEaA xq\0\xf0\xd0\x70\x50;";
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut t: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            if next() % 4 == 0 && len >= 7 {
                let at = (next() % (len as u64 - 6)) as usize;
                t[at..at + 7].copy_from_slice(b"PrEpArE");
            }
            assert_eq!(mentions_prepare(&t), plain(&t), "{t:?}");
        }
    }
}
