//! Domain types of the users service. Each input type can only hold a valid value:
//! it is parsed once at the edge and trusted afterwards. No storage or HTTP type
//! appears here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a value was refused; the message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub &'static str);

/// An email address, trimmed and lower-cased, at most 254 characters. (Serde goes
/// through `parse`, so even a cached copy cannot hold a bad value.)
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl TryFrom<String> for Email {
    type Error = Invalid;

    fn try_from(raw: String) -> Result<Self, Invalid> {
        Self::parse(&raw)
    }
}

impl From<Email> for String {
    fn from(email: Email) -> String {
        email.0
    }
}

impl Email {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err(Invalid("must not be empty"));
        }
        if email.chars().count() > 254 {
            return Err(Invalid("must be at most 254 characters"));
        }
        let (local, domain) = email
            .rsplit_once('@')
            .ok_or(Invalid("must be an email address"))?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local
                .chars()
                .all(|c| c.is_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
        let domain_ok = domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_alphanumeric() || c == '-')
            });
        if local_ok && domain_ok {
            Ok(Self(email))
        } else {
            Err(Invalid("must be an email address"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name: 1..=100 characters after trimming, no control characters, no
/// bidi controls and no invisible characters (see [`is_hidden_char`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(String);

impl TryFrom<String> for UserName {
    type Error = Invalid;

    fn try_from(raw: String) -> Result<Self, Invalid> {
        Self::parse(&raw)
    }
}

impl From<UserName> for String {
    fn from(name: UserName) -> String {
        name.0
    }
}

impl UserName {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let name = raw.trim();
        let length = name.chars().count();
        if length == 0 {
            return Err(Invalid("must not be empty"));
        }
        if length > 100 {
            return Err(Invalid("must be at most 100 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(Invalid("must not contain control characters"));
        }
        if name.chars().any(is_hidden_char) {
            return Err(Invalid(
                "must not contain bidi controls or invisible characters",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Characters that make a name display differently from what it is: the bidi
/// controls (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069: they can
/// reorder the text around a name) and invisible characters (U+200B zero-width
/// space, U+2060 word joiner, U+FEFF byte order mark: two names that look the
/// same would differ).
pub fn is_hidden_char(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// A password in clear, 8..=128 characters. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

impl Password {
    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let length = raw.chars().count();
        if length < 8 {
            return Err(Invalid("must be at least 8 characters"));
        }
        if length > 128 {
            return Err(Invalid("must be at most 128 characters"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A PHC-format password hash (`$argon2id$...`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(pub String);

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        match raw {
            "customer" => Ok(Self::Customer),
            "admin" => Ok(Self::Admin),
            _ => Err(Invalid("unknown role")),
        }
    }
}

/// An account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: Uuid,
    pub email: Email,
    pub name: UserName,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An account with its credential, as stored.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub user: User,
    pub password_hash: PasswordHash,
    /// Moves on with every password change; a token carries the epoch it was
    /// issued in and is refused in any other (the store bumps it when it writes
    /// a new hash).
    pub session_epoch: i64,
}

/// The state of a user's sessions that decides whether a token is live: the
/// current epoch, and the ids of the unexpired tokens that were signed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub epoch: i64,
    /// Sorted, for a binary search.
    pub ended: Vec<Uuid>,
}

impl SessionState {
    pub fn new(epoch: i64, mut ended: Vec<Uuid>) -> Self {
        ended.sort_unstable();
        ended.dedup();
        Self { epoch, ended }
    }

    /// Is a token of this epoch and id still live?
    pub fn admits(&self, epoch: i64, token_id: Uuid) -> bool {
        self.epoch == epoch && self.ended.binary_search(&token_id).is_err()
    }
}

/// A sign-up.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: Email,
    pub name: UserName,
    pub password: Password,
}

/// A partial update; `None` leaves the field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub email: Option<Email>,
    pub name: Option<UserName>,
    pub password: Option<Password>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        assert!(Email::parse("a.b+c@sub.example.org").is_ok());
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a b@c.d",
            "a@-b.com",
            "a@b..com",
            ".a@b.com",
            "a..b@c.com",
            "a@b.c\u{0}m",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("{}@{}.com", "a".repeat(64), "b".repeat(63));
        assert!(Email::parse(&long).is_ok());
        let too_long = format!("a@{}.com", vec!["b".repeat(60); 5].join("."));
        assert!(Email::parse(&too_long).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(UserName::parse("  Ada ").unwrap().as_str(), "Ada");
        assert!(UserName::parse("   ").is_err());
        assert!(UserName::parse(&"é".repeat(100)).is_ok());
        assert!(UserName::parse(&"é".repeat(101)).is_err());
        assert!(UserName::parse("a\u{7}b").is_err());
        for hidden in [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{200B}', '\u{FEFF}', '\u{200E}', '\u{200F}', '\u{061C}',
        ] {
            for name in [
                format!("Ada{hidden}"),
                format!("{hidden}Ada"),
                format!("A{hidden}da"),
            ] {
                assert_eq!(
                    UserName::parse(&name),
                    Err(Invalid(
                        "must not contain bidi controls or invisible characters"
                    )),
                    "{name:?}"
                );
            }
        }
        // Joiners that scripts and emoji need stay allowed.
        assert!(UserName::parse("\u{1F469}\u{200D}\u{1F4BB} Ada").is_ok());
        assert!(
            UserName::parse("\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}")
                .is_ok()
        );
    }

    #[test]
    fn passwords() {
        assert!(Password::parse("1234567").is_err());
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse(&"x".repeat(128)).is_ok());
        assert!(Password::parse(&"x".repeat(129)).is_err());
        assert_eq!(
            format!("{:?}", Password::parse("secret-pass").unwrap()),
            "Password(***)"
        );
    }
}
