//! [`BackingSpec`]: what `--backing` names, a path or an RBD image.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::rbd::{RbdSpec, PREFIX};

/// A backing store as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingSpec {
    /// A raw file or block device.
    File(PathBuf),
    /// An RBD image (`rbd:POOL/IMAGE[:conf=PATH][:id=NAME]`).
    Rbd(RbdSpec),
}

impl BackingSpec {
    /// The path, for a file or block device.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            BackingSpec::File(p) => Some(p),
            BackingSpec::Rbd(_) => None,
        }
    }
}

impl FromStr for BackingSpec {
    type Err = String;

    /// `rbd:...` is an image; anything else a path (write `./rbd:x` for a
    /// file whose name starts with `rbd:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with(PREFIX) {
            RbdSpec::parse(s).map(BackingSpec::Rbd)
        } else if s.is_empty() {
            Err("the backing store name is empty".into())
        } else {
            Ok(BackingSpec::File(PathBuf::from(s)))
        }
    }
}

impl From<PathBuf> for BackingSpec {
    fn from(p: PathBuf) -> Self {
        BackingSpec::File(p)
    }
}

impl fmt::Display for BackingSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingSpec::File(p) => write!(f, "{}", p.display()),
            BackingSpec::Rbd(r) => write!(f, "{r}"),
        }
    }
}
