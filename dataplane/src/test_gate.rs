//! One rule for tests that need something the machine may lack (root, network namespaces, a
//! tool): outside CI they print a SKIP line and return; in CI (`CI=true`, as GitHub Actions
//! and most CI systems set it) the missing prerequisite is a failure, so a test CI was meant
//! to run can never pass by not running.

/// Whether the tests run in CI (`CI` is `true` or `1`).
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

fn ci_value(v: Option<&str>) -> bool {
    matches!(v, Some(v) if v.eq_ignore_ascii_case("true") || v == "1")
}

/// Test `test` cannot run here because of `why`: panics in CI, else prints a SKIP line (the
/// caller then returns).
pub fn skip(test: &str, why: &str) {
    assert!(
        !in_ci(),
        "{test}: prerequisite missing in CI: {why} (CI must provide it; see tools/install-deps.sh)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// `Some(why)` when not root; see [`skip`].
pub fn not_root(why: &str) -> Option<String> {
    // SAFETY: geteuid has no memory effects.
    (unsafe { libc::geteuid() } != 0).then(|| format!("needs root ({why})"))
}

/// Skips (see [`skip`]) and returns false when not root.
pub fn require_root(test: &str, why: &str) -> bool {
    match not_root(why) {
        Some(w) => {
            skip(test, &w);
            false
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        assert!(ci_value(Some("true")));
        assert!(ci_value(Some("TRUE")));
        assert!(ci_value(Some("1")));
        assert!(!ci_value(Some("false")));
        assert!(!ci_value(Some("")));
        assert!(!ci_value(None));
    }

    #[test]
    fn skip_fails_in_ci() {
        // Run the check in a child so the environment of this process stays untouched.
        if std::env::var_os("TEST_GATE_CHILD").is_some() {
            skip("child", "nothing");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let run = |ci: &str| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "test_gate::tests::skip_fails_in_ci",
                    "--nocapture",
                ])
                .env("TEST_GATE_CHILD", "1")
                .env("CI", ci)
                .output()
                .unwrap()
        };
        let out = run("true");
        assert!(!out.status.success());
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(all.contains("prerequisite missing in CI"), "{all}");
        let out = run("false");
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("SKIP child: nothing"));
    }
}
