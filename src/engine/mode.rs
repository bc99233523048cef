//! The cache modes: how the cache handles writes (the routing itself is the
//! disk layer's; switching is `switch.rs`).

/// How the cache handles writes; persisted in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Writes complete in the cache and are written back later.
    #[default]
    Writeback,
    /// Writes complete once on the backing store and in the cache.
    Writethrough,
    /// Writes go to the backing store only; reads fill the cache.
    Writearound,
    /// The cache is not used.
    None,
}

impl CacheMode {
    /// The number stored in cache_info.
    pub fn code(self) -> u8 {
        match self {
            CacheMode::Writeback => 0,
            CacheMode::Writethrough => 1,
            CacheMode::Writearound => 2,
            CacheMode::None => 3,
        }
    }

    /// From cache_info (validated there, so never out of range).
    pub fn from_code(c: u8) -> CacheMode {
        match c {
            1 => CacheMode::Writethrough,
            2 => CacheMode::Writearound,
            3 => CacheMode::None,
            _ => CacheMode::Writeback,
        }
    }
}

impl CacheMode {
    /// Every mode, in the order of its code.
    pub const ALL: [CacheMode; 4] = [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Writearound,
        CacheMode::None,
    ];
}

impl std::str::FromStr for CacheMode {
    type Err = String;

    /// A mode by its name (`writeback`, `writethrough`, `writearound`,
    /// `none`).
    fn from_str(s: &str) -> Result<CacheMode, String> {
        CacheMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a cache mode (writeback, writethrough, writearound, none)")
            })
    }
}

impl CacheMode {
    /// Its name, as the command line and status spell it.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writearound => "writearound",
            CacheMode::None => "none",
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
