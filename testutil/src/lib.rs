//! What a test does when the machine lacks something it needs (root, /dev/kvm, a tool, a
//! filesystem feature): on a developer's machine it says `SKIPPED: <test>: <why>` on stderr
//! and passes without testing; under `CI=true` (or `CI=1`) the absence is a failure, never a
//! silent pass. Every test of the workspace asks here, so there is one reading of CI.

/// Whether a missing capability fails instead of skipping: `CI` is `true` or `1`.
pub fn strict() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true" | "1"))
}

/// `present`, or a skip with `why` (a failure under CI) for `test`.
pub fn require(present: bool, test: &str, why: &str) -> bool {
    if present {
        return true;
    }
    assert!(!strict(), "{test}: {why}; CI=true, so this fails instead of skipping");
    eprintln!("SKIPPED: {test}: {why}");
    false
}

/// Root, or a skip saying what root is for.
pub fn require_root(test: &str, what_for: &str) -> bool {
    require(nix::unistd::geteuid().is_root(), test, &format!("needs root to {what_for}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn present_passes_whatever_ci_says() {
        assert!(super::require(true, "t", "never shown"));
    }
}
