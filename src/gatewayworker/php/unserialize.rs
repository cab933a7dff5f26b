//! PHP's `unserialize()`: a reader bounded by [`Limits`] (depth, elements,
//! declared counts checked against the bytes left before anything is
//! allocated).

use super::*;

/// PHP's `unserialize($bytes)` with the default [`Limits`].
pub fn unserialize(bytes: &[u8]) -> Result<Value, PhpError> {
    unserialize_with(bytes, Limits::DEFAULT)
}

/// PHP's `unserialize($bytes)` within `limits`; the whole input must be one
/// value.
pub fn unserialize_with(bytes: &[u8], limits: Limits) -> Result<Value, PhpError> {
    let mut reader = Reader {
        input: bytes,
        pos: 0,
        limits,
        elements: 0,
    };
    let value = reader.value(0)?;
    if reader.pos != bytes.len() {
        return Err(PhpError::TrailingBytes { offset: reader.pos });
    }
    Ok(value)
}

/// The smallest array entry, `i:0;N;`: a declared count needs this many bytes
/// per entry, checked before anything is allocated for it.
const MIN_ENTRY_LEN: u64 = 6;

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    limits: Limits,
    elements: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.input.len().saturating_sub(self.pos)
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn next(&mut self) -> Result<u8, PhpError> {
        let byte = self
            .peek()
            .ok_or(PhpError::UnexpectedEnd { offset: self.pos })?;
        self.pos += 1;
        Ok(byte)
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), PhpError> {
        match self.peek() {
            None => Err(PhpError::UnexpectedEnd { offset: self.pos }),
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            Some(_) => Err(PhpError::Expected {
                offset: self.pos,
                expected,
            }),
        }
    }

    /// Skips ASCII digits; returns how many.
    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn value(&mut self, depth: usize) -> Result<Value, PhpError> {
        let start = self.pos;
        let tag = self.next()?;
        if tag == b'N' {
            self.expect(b';', "';' after N")?;
            return Ok(Value::Null);
        }
        let unsupported = |what| PhpError::Unsupported {
            offset: start,
            what,
        };
        match tag {
            b'b' | b'i' | b'd' | b's' | b'a' => {}
            b'O' | b'C' => return Err(unsupported("object")),
            b'E' => return Err(unsupported("enum")),
            b'r' | b'R' => return Err(unsupported("reference")),
            b'S' => return Err(unsupported("escaped string")),
            other => {
                return Err(PhpError::UnknownType {
                    offset: start,
                    tag: char::from(other),
                })
            }
        }
        self.expect(b':', "':' after the type")?;
        match tag {
            b'b' => {
                let value = match self.next()? {
                    b'0' => false,
                    b'1' => true,
                    _ => {
                        return Err(PhpError::Expected {
                            offset: self.pos - 1,
                            expected: "0 or 1",
                        })
                    }
                };
                self.expect(b';', "';' after a bool")?;
                Ok(Value::Bool(value))
            }
            b'i' => self.int().map(Value::Int),
            b'd' => self.float().map(Value::Float),
            b's' => self.string().map(Value::String),
            _ => self.array(start, depth + 1).map(Value::Array),
        }
    }

    /// `[+-]?[0-9]+;` after `i:`.
    fn int(&mut self) -> Result<i64, PhpError> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'+' | b'-')) {
            self.pos += 1;
        }
        if self.digits() == 0 {
            return Err(self.expected_or_end("a digit"));
        }
        let text = &self.input[start..self.pos];
        self.expect(b';', "';' after an integer")?;
        // The text is ASCII sign and digits, so only the range can fail.
        std::str::from_utf8(text)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or(PhpError::IntegerOutOfRange { offset: start })
    }

    /// PHP's float grammar after `d:`: `NAN`, `INF`, `-INF`, or
    /// `[+-]?` digits with an optional fraction and an optional exponent.
    fn float(&mut self) -> Result<f64, PhpError> {
        let rest = &self.input[self.pos..];
        for (word, value) in [
            (&b"NAN"[..], f64::NAN),
            (b"INF", f64::INFINITY),
            (b"-INF", f64::NEG_INFINITY),
        ] {
            if rest.starts_with(word) {
                self.pos += word.len();
                self.expect(b';', "';' after a float")?;
                return Ok(value);
            }
        }
        let start = self.pos;
        if matches!(self.peek(), Some(b'+' | b'-')) {
            self.pos += 1;
        }
        let mut mantissa_digits = self.digits();
        if self.peek() == Some(b'.') {
            self.pos += 1;
            mantissa_digits += self.digits();
        }
        if mantissa_digits == 0 {
            return Err(self.expected_or_end("a float"));
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.expected_or_end("exponent digits"));
            }
        }
        let text = &self.input[start..self.pos];
        self.expect(b';', "';' after a float")?;
        // The grammar above is a subset of what Rust's parser accepts.
        std::str::from_utf8(text)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or(PhpError::Expected {
                offset: start,
                expected: "a float",
            })
    }

    /// A length (`[0-9]+`) that must fit in what remains, each unit taking
    /// `unit_len` bytes.
    fn length(&mut self, unit_len: u64) -> Result<usize, PhpError> {
        let start = self.pos;
        if self.digits() == 0 {
            return Err(self.expected_or_end("a length"));
        }
        let declared = self.input[start..self.pos].iter().fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        });
        let fits = declared
            .checked_mul(unit_len)
            .is_some_and(|needed| needed <= self.remaining() as u64);
        match usize::try_from(declared) {
            Ok(len) if fits => Ok(len),
            _ => Err(PhpError::LengthPastEnd {
                offset: start,
                declared,
            }),
        }
    }

    /// `N:"bytes";` after `s:`.
    fn string(&mut self) -> Result<Vec<u8>, PhpError> {
        let len = self.length(1)?;
        self.expect(b':', "':' after a string length")?;
        self.expect(b'"', "'\"' before a string")?;
        if len > self.remaining() {
            return Err(PhpError::UnexpectedEnd {
                offset: self.input.len(),
            });
        }
        let bytes = self.input[self.pos..self.pos + len].to_vec();
        self.pos += len;
        self.expect(b'"', "'\"' after a string of the declared length")?;
        self.expect(b';', "';' after a string")?;
        Ok(bytes)
    }

    /// `N:{key value ...}` after `a:`.
    fn array(&mut self, start: usize, depth: usize) -> Result<Array, PhpError> {
        if depth > self.limits.max_depth {
            return Err(PhpError::TooDeep {
                offset: start,
                max: self.limits.max_depth,
            });
        }
        let count = self.length(MIN_ENTRY_LEN)?;
        self.elements = self.elements.saturating_add(count);
        if self.elements > self.limits.max_elements {
            return Err(PhpError::TooManyElements {
                offset: start,
                max: self.limits.max_elements,
            });
        }
        self.expect(b':', "':' after an array count")?;
        self.expect(b'{', "'{' before array entries")?;
        let mut array = Array::with_capacity(count);
        for _ in 0..count {
            let key = self.key()?;
            let value = self.value(depth)?;
            // As PHP: a repeated key keeps its place and takes the new value.
            array.insert(key, value);
        }
        self.expect(b'}', "'}' after the declared number of entries")?;
        Ok(array)
    }

    fn key(&mut self) -> Result<Key, PhpError> {
        let start = self.pos;
        let tag = self.next()?;
        if !matches!(tag, b'i' | b's') {
            return Err(PhpError::InvalidKey { offset: start });
        }
        self.expect(b':', "':' after the type")?;
        if tag == b'i' {
            self.int().map(Key::Int)
        } else {
            self.string().map(Key::from_bytes)
        }
    }

    fn expected_or_end(&self, expected: &'static str) -> PhpError {
        if self.pos >= self.input.len() {
            PhpError::UnexpectedEnd { offset: self.pos }
        } else {
            PhpError::Expected {
                offset: self.pos,
                expected,
            }
        }
    }
}
