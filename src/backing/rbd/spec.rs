//! The `rbd:` name of an image, in QEMU's filename syntax:
//! `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:conf=PATH][:id=NAME][:KEY=VALUE...]`.
//!
//! `conf` is the Ceph configuration file, `id` the client name without
//! `client.`; any other `KEY=VALUE` is a Ceph option set on the connection
//! (as QEMU does). A backslash escapes the next character (`\:`, `\@`, `\/`).

use std::fmt;

/// A parsed `rbd:` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace inside the pool, if any.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// A snapshot (read-only).
    pub snapshot: Option<String>,
    /// Ceph configuration file (`conf=`); Ceph's default search otherwise.
    pub conf: Option<String>,
    /// Client name without `client.` (`id=`); `admin` otherwise.
    pub id: Option<String>,
    /// Other Ceph options, in the order given.
    pub options: Vec<(String, String)>,
}

/// The prefix that marks a backing store as an RBD image.
pub const PREFIX: &str = "rbd:";

impl RbdSpec {
    /// Parse `rbd:...`; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<RbdSpec, String> {
        let rest = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("{s:?} does not start with {PREFIX}"))?;
        let fields = split_unescaped(rest, ':');
        let mut fields = fields.into_iter();
        let path = fields.next().unwrap_or_default();
        let (path, snapshot) = match split_unescaped(&path, '@').as_slice() {
            [p] => (p.clone(), None),
            [p, snap] if !snap.is_empty() => (p.clone(), Some(unescape(snap))),
            _ => return Err(format!("{s}: a bad @snapshot part")),
        };
        let parts: Vec<String> = split_unescaped(&path, '/')
            .iter()
            .map(|p| unescape(p))
            .collect();
        let (pool, namespace, image) = match parts.as_slice() {
            [pool, image] => (pool.clone(), None, image.clone()),
            [pool, ns, image] => (pool.clone(), Some(ns.clone()), image.clone()),
            _ => {
                return Err(format!(
                    "{s}: expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE"
                ))
            }
        };
        if pool.is_empty() || image.is_empty() || namespace.as_deref() == Some("") {
            return Err(format!(
                "{s}: the pool, namespace and image names must not be empty"
            ));
        }
        let mut spec = RbdSpec {
            pool,
            namespace,
            image,
            snapshot,
            conf: None,
            id: None,
            options: Vec::new(),
        };
        for field in fields {
            let kv = split_unescaped(&field, '=');
            let [key, value] = kv.as_slice() else {
                return Err(format!("{s}: option {field:?} is not KEY=VALUE"));
            };
            let (key, value) = (unescape(key), unescape(value));
            if key.is_empty() {
                return Err(format!("{s}: option {field:?} has no key"));
            }
            match key.as_str() {
                "conf" => spec.conf = Some(value),
                "id" => spec.id = Some(value),
                _ => spec.options.push((key, value)),
            }
        }
        Ok(spec)
    }

    /// `POOL/[NAMESPACE/]IMAGE[@SNAP]`, for messages.
    pub fn image_name(&self) -> String {
        let mut s = self.pool.clone();
        if let Some(ns) = &self.namespace {
            s = format!("{s}/{ns}");
        }
        s = format!("{s}/{}", self.image);
        if let Some(snap) = &self.snapshot {
            s = format!("{s}@{snap}");
        }
        s
    }
}

impl fmt::Display for RbdSpec {
    /// The name back in `rbd:` syntax (Ceph options included, escaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = |s: &str| escape(s, ":@/=\\");
        let v = |s: &str| escape(s, ":\\");
        write!(f, "{PREFIX}{}", e(&self.pool))?;
        if let Some(ns) = &self.namespace {
            write!(f, "/{}", e(ns))?;
        }
        write!(f, "/{}", e(&self.image))?;
        if let Some(snap) = &self.snapshot {
            write!(f, "@{}", e(snap))?;
        }
        if let Some(c) = &self.conf {
            write!(f, ":conf={}", v(c))?;
        }
        if let Some(id) = &self.id {
            write!(f, ":id={}", v(id))?;
        }
        for (k, val) in &self.options {
            write!(f, ":{}={}", e(k), v(val))?;
        }
        Ok(())
    }
}

/// Split at `sep` where it is not escaped; escapes are kept for the caller
/// to undo with [`unescape`] once the structure is known.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let last = out.last_mut().expect("never empty");
            last.push(c);
            if let Some(n) = chars.next() {
                last.push(n);
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Backslash every character of `s` that is in `special`.
fn escape(s: &str, special: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if special.contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_names() {
        let s = RbdSpec::parse("rbd:rbd/vm1:conf=/tmp/c/ceph.conf:id=admin").unwrap();
        assert_eq!(s.pool, "rbd");
        assert_eq!(s.image, "vm1");
        assert_eq!(s.namespace, None);
        assert_eq!(s.conf.as_deref(), Some("/tmp/c/ceph.conf"));
        assert_eq!(s.id.as_deref(), Some("admin"));
        assert!(s.options.is_empty());

        let s = RbdSpec::parse("rbd:p/ns/img@snap1:rbd_cache=false").unwrap();
        assert_eq!(
            (s.pool.as_str(), s.namespace.as_deref(), s.image.as_str()),
            ("p", Some("ns"), "img")
        );
        assert_eq!(s.snapshot.as_deref(), Some("snap1"));
        assert_eq!(s.options, vec![("rbd_cache".into(), "false".into())]);
        assert_eq!(s.image_name(), "p/ns/img@snap1");
    }

    #[test]
    fn escapes_round_trip() {
        let s = RbdSpec::parse(r"rbd:rbd/a\:b:conf=/x\:y/ceph.conf").unwrap();
        assert_eq!(s.image, "a:b");
        assert_eq!(s.conf.as_deref(), Some("/x:y/ceph.conf"));
        assert_eq!(RbdSpec::parse(&s.to_string()).unwrap(), s);
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        for (bad, want) in [
            ("rbd:", "expected rbd:POOL/IMAGE"),
            ("rbd:img", "expected rbd:POOL/IMAGE"),
            ("rbd:a/b/c/d", "expected rbd:POOL/IMAGE"),
            ("rbd:/img", "must not be empty"),
            ("rbd:p/", "must not be empty"),
            ("rbd:p/i@", "@snapshot"),
            ("rbd:p/i:conf", "not KEY=VALUE"),
            ("rbd:p/i:=x", "no key"),
            ("file.img", "does not start with"),
        ] {
            let e = RbdSpec::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
