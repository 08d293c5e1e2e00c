//! Deterministic ids. Where a retry must find what an earlier attempt created, the id is a
//! UUIDv5 of the facts that identify the thing, so every replica derives the same one.

use uuid::Uuid;

/// Namespace of every Closedloop UUIDv5 (a fixed random UUID).
const NAMESPACE: Uuid = Uuid::from_u128(0x6c0c_3f4e_8a51_4d2b_9b0e_2f6d_51a7_c3e9);

/// A UUIDv5 over the given parts, separated so ("ab","c") and ("a","bc") differ.
pub fn derive(kind: &str, parts: &[&str]) -> Uuid {
    let mut name = Vec::with_capacity(64);
    name.extend_from_slice(kind.as_bytes());
    for part in parts {
        name.push(0x1f);
        name.extend_from_slice(part.as_bytes());
    }
    Uuid::new_v5(&NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_parts_same_id_and_boundaries_matter() {
        assert_eq!(derive("c", &["a", "b"]), derive("c", &["a", "b"]));
        assert_ne!(derive("c", &["ab", "c"]), derive("c", &["a", "bc"]));
        assert_ne!(derive("x", &["a"]), derive("y", &["a"]));
    }
}
