//! Sizes and seeds a developer may override from the environment. A size
//! has a floor: below it the test would check next to nothing and still
//! pass (`PCACHE_KILLS=0`), so a run asking for less fails and says why.
//! A value that does not parse fails too, rather than being ignored.

/// The size `var` asks for, or `default`; at least `floor`.
pub fn size(var: &str, default: u64, floor: u64) -> u64 {
    let v = number(var).unwrap_or(default);
    assert!(
        v >= floor,
        "{var}={v} is below {floor}, the least that still tests something: raise it or unset it"
    );
    v
}

/// The seed `var` asks for, or `default`.
pub fn seed(var: &str, default: u64) -> u64 {
    number(var).unwrap_or(default)
}

fn number(var: &str) -> Option<u64> {
    let s = std::env::var(var).ok()?;
    Some(
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not a number")),
    )
}
