//! The built-in methods (`--handler builtin`), registered through the same [`Handlers`] API as user code.

use std::time::Duration;

use serde_json::{Number, Value, json};

use crate::handler::{HandlerError, HandlerResult, Handlers, Params};

/// The longest `sleep` accepted, so a typo cannot park a worker slot for days.
pub const MAX_SLEEP_MS: u64 = 3_600_000;

/// `echo`, `add`, `sleep` and `fail`.
pub fn handlers() -> Handlers {
    Handlers::new()
        .method("echo", |params: Params| async move { Ok(params.into_value()) })
        .method("add", |params: Params| async move { add(&params) })
        .method("sleep", |params: Params| async move {
            let ms = sleep_ms(&params)?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({ "slept_ms": ms }))
        })
        .method("fail", |params: Params| async move {
            Err(HandlerError::failed("fail always fails").with_details(params.into_value()))
        })
}

/// `crash`: aborts the whole process, for tests of poison messages only (`--enable-crash-method`).
pub fn crash_handler() -> Handlers {
    Handlers::new().method("crash", |_params: Params| async move {
        tracing::error!("crash method called: aborting the process (test-only method)");
        std::process::abort()
    })
}

/// `add`: two numbers, positional `[a, b]` or named `{"a": .., "b": ..}`. Integers stay integers.
pub fn add(params: &Params) -> HandlerResult {
    let (a, b) = add_operands(params)?;
    if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64())
        && let Some(sum) = a.checked_add(b)
    {
        return Ok(Value::Number(sum.into()));
    }
    let sum = a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN);
    Number::from_f64(sum)
        .map(Value::Number)
        .ok_or_else(|| HandlerError::bad_request(format!("the sum is not a finite number: {sum}")))
}

fn add_operands(params: &Params) -> Result<(&Number, &Number), HandlerError> {
    let usage = "add takes two numbers: [a, b] or {\"a\": a, \"b\": b}";
    let count = match params.as_value() {
        Value::Array(items) => items.len(),
        Value::Object(fields) => fields.len(),
        _ => return Err(HandlerError::bad_request(usage)),
    };
    let number = |index, name| match params.arg(index, name) {
        Some(Value::Number(n)) => Ok(n),
        Some(other) => Err(HandlerError::bad_request(format!("{name} is not a number: {other}"))),
        None => Err(HandlerError::bad_request(usage)),
    };
    let operands = (number(0, "a")?, number(1, "b")?);
    if count != 2 {
        return Err(HandlerError::bad_request(usage));
    }
    Ok(operands)
}

/// `sleep`'s duration: `{"ms": N}`, `[N]` or `N`.
pub fn sleep_ms(params: &Params) -> Result<u64, HandlerError> {
    let value = match params.as_value() {
        Value::Number(_) => Some(params.as_value()),
        _ => params.arg(0, "ms"),
    };
    let ms = value
        .and_then(Value::as_u64)
        .ok_or_else(|| HandlerError::bad_request("sleep takes {\"ms\": N} with N a non-negative integer"))?;
    if ms > MAX_SLEEP_MS {
        return Err(HandlerError::bad_request(format!("sleep is capped at {MAX_SLEEP_MS} ms")));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_client::protocol::ErrorCode;

    fn add_json(params: Value) -> HandlerResult {
        add(&Params::new(params))
    }

    #[test]
    fn add_takes_positional_and_named_numbers() {
        assert_eq!(add_json(json!([1, 2])), Ok(json!(3)));
        assert_eq!(add_json(json!({"a": 1, "b": 2})), Ok(json!(3)));
        assert_eq!(add_json(json!([-5, 2])), Ok(json!(-3)));
    }

    #[test]
    fn add_keeps_integers_and_adds_floats() {
        assert_eq!(add_json(json!([1.5, 2])), Ok(json!(3.5)));
        assert_eq!(add_json(json!([i64::MAX, 1])), Ok(json!(i64::MAX as f64 + 1.0)));
    }

    #[test]
    fn add_rejects_anything_but_two_numbers() {
        for params in [
            json!(["1", 2]),
            json!([1]),
            json!([1, 2, 3]),
            json!({"a": 1}),
            json!({"a": 1, "b": 2, "c": 3}),
            json!({"a": 1, "b": null}),
            json!(null),
            json!(3),
        ] {
            let err = add_json(params.clone()).unwrap_err();
            assert_eq!(err.code(), ErrorCode::BadRequest, "{params}");
        }
    }

    #[test]
    fn sleep_reads_ms_in_every_shape() {
        assert_eq!(sleep_ms(&Params::new(json!({"ms": 5}))), Ok(5));
        assert_eq!(sleep_ms(&Params::new(json!([7]))), Ok(7));
        assert_eq!(sleep_ms(&Params::new(json!(9))), Ok(9));
        assert!(sleep_ms(&Params::new(json!({"ms": -1}))).is_err());
        assert!(sleep_ms(&Params::new(json!({"ms": MAX_SLEEP_MS + 1}))).is_err());
    }

    #[tokio::test]
    async fn fail_is_a_handler_error_with_the_params_as_details() {
        let call = crate::handler::Call {
            method: "fail".into(),
            params: Params::new(json!({"why": "test"})),
            trace: Default::default(),
            deadline: None,
            redelivered: false,
        };
        let err = handlers().dispatch(call).unwrap().await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::HandlerError);
        assert_eq!(err.details(), Some(&json!({"why": "test"})));
    }
}
