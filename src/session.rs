//! Per-connection sessions: a JSON object, replaced by set_session and merged
//! by update_session.

use serde_json::Value;

pub use gatecast_emitter::Session;

/// Merges `update` into `session` as GatewayWorker's updateSession does
/// (PHP's `array_replace_recursive`): nested objects merge key by key, any
/// other value replaces what was there.
pub fn merge(session: &mut Session, update: Session) {
    for (key, value) in update {
        match (session.get_mut(&key), value) {
            (Some(Value::Object(old)), Value::Object(new)) => merge(old, new),
            (_, value) => {
                session.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_replaces_scalars_and_merges_objects() {
        let mut s = json!({"a": 1, "nested": {"x": 1, "y": 2}, "keep": true})
            .as_object()
            .cloned()
            .unwrap();
        let update = json!({"a": 2, "nested": {"y": 3, "z": 4}, "new": [1]})
            .as_object()
            .cloned()
            .unwrap();
        merge(&mut s, update);
        assert_eq!(
            Value::Object(s),
            json!({"a": 2, "nested": {"x": 1, "y": 3, "z": 4}, "keep": true, "new": [1]})
        );
    }
}
