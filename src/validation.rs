//! Validation of a job's `config`: errors that name the offending field as
//! the request spells it (`config.epochs`), and a checker that reads fields
//! with their defaults and bounds. Shared by the job configs and by each
//! pretext task's own config.

use serde::Serialize;

use crate::ml::backbone::Backbone;

/// A field that failed validation, named as in the request (`config.epochs`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// An error about `config.{field}`.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: format!("config.{field}"),
            message: message.into(),
        }
    }
}

/// Collects validation errors while reading fields.
pub struct FieldChecker {
    errors: Vec<FieldError>,
}

impl Default for FieldChecker {
    fn default() -> Self {
        Self::new()
    }
}

impl FieldChecker {
    /// A checker with no errors yet.
    pub fn new() -> Self {
        Self { errors: Vec::new() }
    }

    /// Records that `field` is wrong, and why.
    pub fn reject(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// Records every error of a nested check.
    pub fn absorb(&mut self, errors: Vec<FieldError>) {
        self.errors.extend(errors);
    }

    /// The value of an integer field (`default` when absent), checked to lie
    /// in `[min, max]`. A value outside is recorded as an error and returned
    /// clamped into the range, so that what is derived from it while the
    /// rest is checked cannot overflow.
    pub fn int(
        &mut self,
        field: &str,
        value: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let value = value.unwrap_or(default);
        if value < min || value > max {
            self.errors.push(FieldError::new(
                field,
                format!("must be between {min} and {max} (got {value})"),
            ));
        }
        value.max(min).min(max)
    }

    /// The value of a float field (`default` when absent), checked to be
    /// finite and in `[min, max]` (or `(min, max]` when `min_exclusive`);
    /// one that is not is recorded as an error and `default` is returned.
    pub fn float(
        &mut self,
        field: &str,
        value: Option<f64>,
        default: f64,
        min: f64,
        max: f64,
        min_exclusive: bool,
    ) -> f64 {
        let value = value.unwrap_or(default);
        let low_ok = if min_exclusive {
            value > min
        } else {
            value >= min
        };
        if !value.is_finite() || !low_ok || value > max {
            let open = if min_exclusive { "(" } else { "[" };
            self.errors.push(FieldError::new(
                field,
                format!("must be in {open}{min}, {max}] (got {value})"),
            ));
            return default;
        }
        value
    }

    /// The backbone named (`default` when absent).
    pub fn backbone(&mut self, value: Option<&str>, default: Backbone) -> Backbone {
        match value {
            None => default,
            Some(name) => Backbone::from_name(name).unwrap_or_else(|| {
                self.errors.push(FieldError::new(
                    "backbone",
                    format!(
                        "unknown backbone `{name}`; use one of {}",
                        Backbone::ALL.join(", ")
                    ),
                ));
                default
            }),
        }
    }

    /// Every error recorded.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.errors
    }

    /// `value` if every field passed, else every error recorded.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// Parses a job's `config` object, naming the field serde complains about.
pub fn parse_config_object<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, Vec<FieldError>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        let unknown = message
            .split('`')
            .nth(1)
            .filter(|_| message.starts_with("unknown field"));
        let field = match (unknown, path.as_str()) {
            (Some(name), _) => format!("config.{name}"),
            (None, ".") => "config".to_string(),
            (None, path) => format!("config.{path}"),
        };
        vec![FieldError { field, message }]
    })
}
