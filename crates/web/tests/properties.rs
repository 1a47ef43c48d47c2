//! Properties of the parsers that read untrusted input: JSON bodies, signed
//! cursors and consistency tokens, and bearer tokens. Each runs a bounded number of
//! generated cases (proptest), so the suite stays fast.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use scaleshop_web::body::{Fields, JsonObject, any as as_is, parse_object};
use scaleshop_web::{ConsistencyToken, ErrorCode, Signer, TokenKeys, page};
use serde_json::{Map, Value};
use uuid::Uuid;

const SECRET: &[u8] = b"a secret of thirty-two bytes ....";

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are reported with their minimal case; nothing is written to the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// JSON without floats (which serde_json does not promise to round-trip exactly).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(".{0,8}", json_value(), 0..8).prop_map(|m| m.into_iter().collect())
}

/// One edit of a string: a character replaced, removed or inserted, or the string
/// cut short or extended.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, char),
    Remove(usize),
    Insert(usize, char),
    Truncate(usize),
    Append(String),
}

fn edit() -> impl Strategy<Value = Edit> {
    // The characters of the encodings, their separators, and anything else.
    let ch = prop_oneof![
        prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
                .chars()
                .collect::<Vec<_>>()
        ),
        any::<char>(),
    ];
    prop_oneof![
        (any::<usize>(), ch.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), ch).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<usize>().prop_map(Edit::Truncate),
        "[A-Za-z0-9_=.-]{1,4}".prop_map(Edit::Append),
    ]
}

fn apply(value: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    for edit in edits {
        let len = chars.len();
        match edit {
            Edit::Replace(i, c) if len > 0 => chars[i % len] = *c,
            Edit::Remove(i) if len > 0 => {
                chars.remove(i % len);
            }
            Edit::Insert(i, c) => chars.insert(i % (len + 1), *c),
            Edit::Truncate(i) if len > 0 => chars.truncate(i % len),
            Edit::Append(s) => chars.extend(s.chars()),
            _ => {}
        }
    }
    chars.into_iter().collect()
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..4)
}

/// A cursor as the list routes make it: the JSON of the last item's key, signed.
fn cursor_for(key: &(String, i64)) -> String {
    let signer = Signer::new(SECRET, "opaque");
    let page = page::parse(Some("limit=1"), &signer).expect("limit=1 is valid");
    let out = page.finish(vec![key.clone(), key.clone()], Clone::clone);
    out.next_cursor.expect("a second row makes a next cursor")
}

fn query_with_cursor(cursor: &str) -> String {
    let encoded: String = form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
    format!("cursor={encoded}")
}

proptest! {
    #![proptest_config(config(256))]

    /// Any JSON object sent as a body is read back exactly.
    #[test]
    fn json_objects_round_trip(object in json_object()) {
        let bytes = serde_json::to_vec(&Value::Object(object.clone())).expect("serializable");
        let parsed = parse_object(&bytes).expect("a JSON object");
        prop_assert_eq!(parsed, object);
    }

    /// Any bytes: an object, a 400 (not JSON) or a 422 (JSON, not an object);
    /// never a panic.
    #[test]
    fn any_body_is_an_object_or_a_client_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let expected = serde_json::from_slice::<Value>(&bytes);
        match (parse_object(&bytes), expected) {
            (Ok(map), Ok(Value::Object(m))) => prop_assert_eq!(map, m),
            (Err(e), Ok(v)) => {
                prop_assert!(!v.is_object());
                prop_assert_eq!(e.code, ErrorCode::Validation);
            }
            (Err(e), Err(_)) => prop_assert_eq!(e.code, ErrorCode::MalformedRequest),
            (Ok(_), _) => prop_assert!(false, "accepted what serde_json refuses"),
        }
    }

    /// Nesting past serde_json's recursion limit is a 400, never a stack overflow.
    #[test]
    fn deep_nesting_is_refused(depth in 1usize..20_000, object in any::<bool>()) {
        let (open, close) = if object { ("{\"a\":", "}") } else { ("[", "]") };
        let body = format!("{{\"x\":{}1{}}}", open.repeat(depth), close.repeat(depth));
        match parse_object(body.as_bytes()) {
            Ok(_) => prop_assert!(depth <= 127),
            Err(e) => {
                prop_assert!(depth >= 128, "refused at depth {depth}");
                prop_assert_eq!(e.code, ErrorCode::MalformedRequest);
            }
        }
    }

    /// `Fields` reports exactly the broken rules: a missing or mistyped required
    /// field, a null or mistyped optional one, and every unknown field once.
    #[test]
    fn fields_report_exactly_the_broken_rules(object in json_object(), email in json_value(), count in json_value(), with_email in any::<bool>(), with_count in any::<bool>()) {
        let mut object = object;
        object.remove("email");
        object.remove("count");
        let mut expected: BTreeSet<String> = object.keys().cloned().collect();
        if with_email {
            object.insert("email".into(), email.clone());
        }
        if with_count {
            object.insert("count".into(), count.clone());
        }
        if !(with_email && email.is_string()) {
            expected.insert("email".into());
        }
        if with_count && !(count.is_i64() || count.as_u64().is_some_and(|n| i64::try_from(n).is_ok())) {
            expected.insert("count".into());
        }

        let mut f = Fields::new(JsonObject(object));
        let e: Option<String> = f.required("email", as_is);
        let c: Option<Option<i64>> = f.optional("count", as_is);
        match f.finish() {
            Ok(()) => {
                prop_assert!(expected.is_empty());
                prop_assert_eq!(e.as_deref(), email.as_str());
                prop_assert_eq!(c, Some(if with_count { count.as_i64() } else { None }));
            }
            Err(error) => {
                prop_assert_eq!(error.code, ErrorCode::Validation);
                let named: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
                let unique: BTreeSet<String> = named.iter().map(|s| (*s).to_owned()).collect();
                prop_assert_eq!(named.len(), unique.len(), "each field named once: {:?}", named);
                prop_assert_eq!(unique, expected);
            }
        }
    }

    /// A cursor made by a list resumes after the same key.
    #[test]
    fn cursors_round_trip(key in (".{0,20}", any::<i64>())) {
        let signer = Signer::new(SECRET, "opaque");
        let cursor = cursor_for(&key);
        let page = page::parse(Some(&query_with_cursor(&cursor)), &signer).expect("a valid cursor");
        prop_assert_eq!(page.after::<(String, i64)>().expect("its payload"), Some(key));
    }

    /// Any change to a cursor makes it a 400 (forged or corrupted), never a
    /// panic and never another position.
    #[test]
    fn edited_cursors_are_refused(key in (".{0,20}", any::<i64>()), edits in edits()) {
        let signer = Signer::new(SECRET, "opaque");
        let cursor = cursor_for(&key);
        let forged = apply(&cursor, &edits);
        prop_assume!(forged != cursor);
        let e = page::parse(Some(&query_with_cursor(&forged)), &signer).expect_err("refused");
        prop_assert_eq!(e.code, ErrorCode::InvalidCursor);
    }

    /// Arbitrary text as a cursor is refused; a cursor from another secret too.
    #[test]
    fn arbitrary_cursors_are_refused(text in ".{0,80}", key in (".{0,8}", any::<i64>())) {
        let signer = Signer::new(SECRET, "opaque");
        match page::parse(Some(&query_with_cursor(&text)), &signer) {
            Err(e) => prop_assert_eq!(e.code, ErrorCode::InvalidCursor),
            Ok(_) => prop_assert!(false, "{text:?} verified"),
        }
        let other = Signer::new(b"another secret of thirty-two ...", "opaque");
        prop_assert!(page::parse(Some(&query_with_cursor(&cursor_for(&key))), &other).is_err());
    }

    /// Consistency tokens round-trip; any change is refused; a cursor is never
    /// taken for one (the purpose is signed).
    #[test]
    fn consistency_tokens(
        at in any::<i64>(),
        position in any::<Option<u64>>(),
        edits in edits(),
        key in (".{0,8}", any::<i64>()),
    ) {
        let signer = Signer::new(SECRET, "opaque");
        let token = ConsistencyToken { at_micros: at, position };
        let encoded = token.encode(&signer);
        prop_assert_eq!(ConsistencyToken::decode(&encoded, &signer), Some(token));
        let forged = apply(&encoded, &edits);
        prop_assume!(forged != encoded);
        prop_assert_eq!(ConsistencyToken::decode(&forged, &signer), None);
        prop_assert_eq!(ConsistencyToken::decode(&cursor_for(&key), &signer), None);
    }
}

fn token_keys() -> TokenKeys {
    TokenKeys::new(SECRET, Duration::from_secs(3600))
}

proptest! {
    #![proptest_config(config(128))]

    /// A token names the user and role it was issued for.
    #[test]
    fn tokens_round_trip(id in any::<u128>(), admin in any::<bool>()) {
        let keys = token_keys();
        let user = Uuid::from_u128(id);
        let issued = keys.issue(user, admin, 0).expect("issued");
        let caller = keys.verify(&issued.token).expect("verifies");
        prop_assert_eq!(caller.user_id, user);
        prop_assert_eq!(caller.is_admin, admin);
    }

    /// Any change to a token (header, claims or signature) makes it invalid.
    #[test]
    fn edited_tokens_are_refused(id in any::<u128>(), admin in any::<bool>(), edits in edits()) {
        let keys = token_keys();
        let token = keys.issue(Uuid::from_u128(id), admin, 0).expect("issued").token;
        let forged = apply(&token, &edits);
        prop_assume!(forged != token);
        prop_assert!(keys.verify(&forged).is_none(), "{forged} verified");
    }

    /// Arbitrary text, and arbitrary three-part base64url text, never verifies and
    /// never panics.
    #[test]
    fn arbitrary_tokens_are_refused(text in ".{0,200}", parts in prop::collection::vec("[A-Za-z0-9_-]{0,60}", 3)) {
        let keys = token_keys();
        prop_assert!(keys.verify(&text).is_none());
        prop_assert!(keys.verify(&parts.join(".")).is_none());
    }

    /// Claims a client wrote itself (any role, any algorithm named in the header,
    /// no signature or a signature by another key) are refused.
    #[test]
    fn self_made_tokens_are_refused(role in prop::sample::select(vec!["admin", "customer", "root"]), alg in prop::sample::select(vec!["none", "HS256", "HS512", "RS256"]), signature in "[A-Za-z0-9_-]{0,43}") {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let keys = token_keys();
        let now = chrono::Utc::now().timestamp();
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"typ":"JWT","alg":"{alg}"}}"#));
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"{}","role":"{role}","iat":{now},"exp":{},"iss":"scaleshop","aud":"scaleshop-api"}}"#,
            Uuid::now_v7(),
            now + 600
        ));
        for forged in [
            format!("{header}.{claims}.{signature}"),
            format!("{header}.{claims}."),
            format!("{header}.{claims}"),
        ] {
            prop_assert!(keys.verify(&forged).is_none(), "{} verified", forged);
        }
    }
}
