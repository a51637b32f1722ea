//! containerd's filter syntax for `List`, enough of it for what containerd and its clients send:
//! `FIELD==VALUE`, `FIELD!=VALUE`, `FIELD~=VALUE` (substring), bare `FIELD` (present); fields `name`,
//! `parent`, `kind`, `labels.KEY` (KEY quoted or not); conditions joined by `,` must all hold; a list
//! of filters matches if any of them does. Values may be quoted with `"` and backslash escapes.

/// One condition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    field: Vec<String>,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Present,
    Eq,
    Ne,
    Contains,
}

/// A parsed filter list.
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Cond>>);

/// The fields a filter can look at.
pub trait Fields {
    /// The value of `path` (`["name"]`, `["labels", "k"]`), if any.
    fn field(&self, path: &[String]) -> Option<String>;
}

fn quoted(s: &[u8], i: &mut usize) -> Result<String, String> {
    // s[*i] == '"'
    *i += 1;
    let mut out = Vec::new();
    while *i < s.len() {
        match s[*i] {
            b'\\' if *i + 1 < s.len() => {
                out.push(s[*i + 1]);
                *i += 2;
            }
            b'"' => {
                *i += 1;
                return String::from_utf8(out).map_err(|e| e.to_string());
            }
            c => {
                out.push(c);
                *i += 1;
            }
        }
    }
    Err("unterminated quoted string".into())
}

fn word(s: &[u8], i: &mut usize, stops: &[u8]) -> Result<String, String> {
    if *i < s.len() && s[*i] == b'"' {
        return quoted(s, i);
    }
    let start = *i;
    while *i < s.len() && !stops.contains(&s[*i]) {
        *i += 1;
    }
    String::from_utf8(s[start..*i].to_vec()).map_err(|e| e.to_string())
}

fn parse_one(f: &str) -> Result<Vec<Cond>, String> {
    let s = f.as_bytes();
    let mut i = 0;
    let mut conds = Vec::new();
    loop {
        while i < s.len() && s[i] == b' ' {
            i += 1;
        }
        let mut field = vec![word(s, &mut i, b".=!~,")?];
        while i < s.len() && s[i] == b'.' {
            i += 1;
            field.push(word(s, &mut i, b".=!~,")?);
        }
        if field.iter().any(|p| p.is_empty()) {
            return Err(format!("filter {f:?}: empty field name"));
        }
        let op = if s[i..].starts_with(b"==") {
            Op::Eq
        } else if s[i..].starts_with(b"!=") {
            Op::Ne
        } else if s[i..].starts_with(b"~=") {
            Op::Contains
        } else {
            Op::Present
        };
        let value = if op == Op::Present {
            String::new()
        } else {
            i += 2;
            word(s, &mut i, b",")?
        };
        conds.push(Cond { field, op, value });
        if i >= s.len() {
            return Ok(conds);
        }
        if s[i] != b',' {
            return Err(format!(
                "filter {f:?}: unexpected {:?} at {i}",
                s[i] as char
            ));
        }
        i += 1;
    }
}

impl Filters {
    /// Parses containerd filter strings (empty strings are ignored).
    pub fn parse(filters: &[String]) -> Result<Filters, String> {
        Ok(Filters(
            filters
                .iter()
                .filter(|f| !f.trim().is_empty())
                .map(|f| parse_one(f))
                .collect::<Result<_, _>>()?,
        ))
    }

    /// Whether `item` passes (no filters: everything passes).
    pub fn matches(&self, item: &dyn Fields) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|conds| {
                conds.iter().all(|c| {
                    let v = item.field(&c.field);
                    match c.op {
                        Op::Present => v.is_some(),
                        Op::Eq => v.as_deref() == Some(c.value.as_str()),
                        Op::Ne => v.as_deref() != Some(c.value.as_str()),
                        Op::Contains => v.is_some_and(|v| v.contains(&c.value)),
                    }
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Item {
        name: &'static str,
        parent: &'static str,
        labels: BTreeMap<String, String>,
    }

    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<String> {
            match path {
                [f] if f == "name" => Some(self.name.into()),
                [f] if f == "parent" => Some(self.parent.into()),
                [l, k] if l == "labels" => self.labels.get(k).cloned(),
                _ => None,
            }
        }
    }

    fn item() -> Item {
        Item {
            name: "default/3/sha256:abc",
            parent: "default/2/sha256:def",
            labels: [(
                "containerd.io/snapshot.ref".to_string(),
                "sha256:abc".to_string(),
            )]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn containerd_remote_snapshot_lookup_filter() {
        // What containerd's metadata store sends after a remote Prepare answered AlreadyExists.
        let f = Filters::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/2/sha256:def""#
                .into(),
        ])
        .unwrap();
        assert!(f.matches(&item()));
        let f = Filters::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="other""#.into(),
        ])
        .unwrap();
        assert!(!f.matches(&item()));
    }

    #[test]
    fn operators_presence_and_alternatives() {
        let t = |f: &[&str]| {
            Filters::parse(&f.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .matches(&item())
        };
        assert!(t(&[]));
        assert!(t(&[r#"labels."containerd.io/snapshot.ref""#]));
        assert!(!t(&["labels.missing"]));
        assert!(t(&["name~=sha256"]));
        assert!(t(&["name!=x"]));
        assert!(t(&["name==nope", "parent==default/2/sha256:def"]));
        assert!(!t(&["name==nope", "parent==nope"]));
        assert!(Filters::parse(&["labels.\"unterminated".into()]).is_err());
        assert!(Filters::parse(&["name==a;b".into()]).is_ok());
    }
}
