//! A script's reply: an array whose first element is the outcome code, read element by
//! element by the script's module.

use redis::Value;
use saga_core::{SagaId, SagaStatus, StoreError};

use crate::error::unexpected;

use super::call::ReplyCode;

/// A script reply: an array whose first element names the outcome.
pub(crate) struct Reply {
    op: &'static str,
    items: std::vec::IntoIter<Value>,
}

impl Reply {
    /// Splits a script's reply into its outcome code and the rest.
    pub(crate) fn parse(op: &'static str, value: Value) -> Result<(ReplyCode, Reply), StoreError> {
        let Value::Array(items) = value else {
            return Err(unexpected(
                op,
                &format!("a reply that is not an array: {value:?}"),
            ));
        };
        let mut reply = Reply {
            op,
            items: items.into_iter(),
        };
        let code = reply.string()?;
        Ok((ReplyCode::parse(op, &code)?, reply))
    }

    /// The next element as text.
    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        match self.items.next() {
            Some(Value::BulkString(bytes)) => String::from_utf8(bytes)
                .map_err(|err| unexpected(self.op, &format!("a reply that is not UTF-8: {err}"))),
            Some(Value::SimpleString(text)) => Ok(text),
            Some(Value::Int(n)) => Ok(n.to_string()),
            other => Err(unexpected(
                self.op,
                &format!("{other:?} where text was expected"),
            )),
        }
    }

    /// The next element as a non-negative integer (an integer reply or its text).
    pub(crate) fn uint(&mut self) -> Result<u64, StoreError> {
        match self.items.next() {
            Some(Value::Int(n)) => {
                u64::try_from(n).map_err(|_| unexpected(self.op, &format!("negative number {n}")))
            }
            Some(Value::BulkString(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| {
                    unexpected(self.op, &format!("{bytes:?} where a number was expected"))
                }),
            other => Err(unexpected(
                self.op,
                &format!("{other:?} where a number was expected"),
            )),
        }
    }

    /// The next element as a count of following items.
    pub(crate) fn count(&mut self) -> Result<usize, StoreError> {
        let n = self.uint()?;
        usize::try_from(n).map_err(|_| unexpected(self.op, &format!("count {n} too large")))
    }

    /// The next element as a saga status name.
    pub(crate) fn status(&mut self, saga: SagaId) -> Result<SagaStatus, StoreError> {
        let text = self.string()?;
        text.parse().map_err(|err| StoreError::Corrupt {
            saga,
            problem: format!("{err}"),
        })
    }

    /// The next element as a flag (0 or 1).
    pub(crate) fn flag(&mut self) -> Result<bool, StoreError> {
        Ok(self.uint()? != 0)
    }

    /// The remaining elements as text.
    pub(crate) fn rest(&mut self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::with_capacity(self.items.len());
        while self.items.len() > 0 {
            out.push(self.string()?);
        }
        Ok(out)
    }

    /// Turns the outcomes every script may answer with into their [`StoreError`]s:
    /// `not_found`, `fenced`, `not_writable`, `too_large`, `corrupt`, `invalid`; any other
    /// code is an unexpected reply (of this script).
    pub(crate) fn into_error(mut self, code: ReplyCode, saga: SagaId, fence: u64) -> StoreError {
        let decoded = match code {
            ReplyCode::NotFound => Ok(StoreError::NotFound(saga)),
            ReplyCode::Fenced => self.uint().and_then(|current_fence| {
                let owner = self.string()?;
                Ok(StoreError::Fenced {
                    saga,
                    fence,
                    current_fence,
                    current_owner: (!owner.is_empty()).then_some(owner),
                })
            }),
            ReplyCode::NotWritable => self
                .status(saga)
                .map(|status| StoreError::NotWritable { saga, status }),
            ReplyCode::TooLarge => (|| {
                let what = self.string()?;
                let size = self.count()?;
                let limit = self.count()?;
                Ok(StoreError::TooLarge { what, size, limit })
            })(),
            ReplyCode::Corrupt => self
                .string()
                .map(|problem| StoreError::Corrupt { saga, problem }),
            ReplyCode::Invalid => self.string().map(StoreError::Invalid),
            other => Err(unexpected(
                self.op,
                &format!("outcome {:?}", other.as_str()),
            )),
        };
        decoded.unwrap_or_else(|err| err)
    }
}
