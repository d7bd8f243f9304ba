//! The usage error: a bad command line that clap cannot see. A leaf, so that both the global
//! options and the failure printer can name it.

/// Where a hint starts in svcdb's error texts.
pub(crate) const HINT: &str = "\n  hint: ";

/// An invalid command line that clap cannot see: a required setting given neither as an option
/// nor in the environment. Exits 64, as clap's own errors do.
#[derive(Debug)]
pub struct Usage {
    /// What is missing or wrong.
    message: String,
    /// How to give it.
    hint: String,
}

impl Usage {
    /// A usage error saying what is wrong (`message`) and how to fix it (`hint`).
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{HINT}{}", self.message, self.hint)
    }
}

impl std::error::Error for Usage {}

/// A setting given (an option or the environment) that can never work, as the library's
/// configuration refused it: a malformed `DATABASE_URL`, an unknown `sslmode`, a pool size of
/// 0. Exits 64 like [`Usage`]; the library's error stays in the chain as its `source()`, for
/// its code (`config`) and its message, which the report prints once. The library's other
/// configuration errors (provision's refusals of a role's attributes) are about the
/// database, and exit 1.
#[derive(Debug)]
pub struct InvalidSetting(pub svcdb::Error);

impl std::fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for InvalidSetting {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
