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
