//! PyTorch `torch.save` files (`.pth`, `.pt`, `pytorch_model.bin`) read **without
//! unpickling**: a restricted interpreter of the pickle opcodes that rebuilds only tensors and
//! plain containers (dicts, lists, tuples, strings, numbers). Nothing in the file is ever
//! called or imported: a `GLOBAL` is just a name, and only `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` and `collections.OrderedDict` are given meaning; any other
//! object (an `argparse.Namespace` of training arguments, an optimizer's state) becomes an
//! inert placeholder that is reported, never constructed.
//!
//! The file is a ZIP (PyTorch ≥ 1.6) holding `<prefix>/data.pkl` and one raw little-endian
//! buffer per storage, `<prefix>/data/<key>`. The legacy pre-1.6 format is refused with a hint.

use std::collections::BTreeMap;
use std::path::Path;

use super::safetensors::Dtype;
use super::zip::ZipArchive;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Pickle values this reader builds. Some payloads are only ever shown in error messages.
#[derive(Clone, Debug)]
#[allow(dead_code)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A `GLOBAL` reference (`module.name`), never resolved.
    Global(String),
    /// A storage from a persistent id: element type, key of its buffer, element count.
    Storage {
        dtype: Dtype,
        key: String,
    },
    Tensor(Box<TensorRef>),
    /// An object this reader does not build (its type name).
    Opaque(String),
    Mark,
}

/// A tensor view of a storage.
#[derive(Clone, Debug)]
struct TensorRef {
    dtype: Dtype,
    key: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// The element type of a `torch.*Storage` global: the float types, or [`Dtype::Other`] for
/// integer and boolean storages (buffers such as `position_ids`, skipped).
fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name.rsplit('.').next()? {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" | "IntStorage" | "ShortStorage" | "CharStorage" | "ByteStorage"
        | "BoolStorage" => Dtype::Other,
        _ => return None,
    })
}

/// What [`read`] found besides the tensors.
#[derive(Clone, Debug, Default)]
pub struct TorchReport {
    /// Tensors skipped because they are not floating point (name: storage type).
    pub skipped: Vec<String>,
    /// Types of objects left unbuilt (e.g. `argparse.Namespace`).
    pub opaque: Vec<String>,
    /// The key of a training checkpoint the weights were taken from (`model`, `state_dict`…).
    pub inner_key: Option<String>,
    /// Storage element types converted to f32.
    pub converted: Vec<String>,
}

/// Limits on what a file may make us build.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;
/// Tensors above this many elements are refused before allocating (4 GiB of f32).
const MAX_ELEMENTS: usize = 1 << 30;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: BTreeMap<u32, Value>,
    opaque: Vec<String>,
    path: &'a Path,
}

impl<'a> Machine<'a> {
    fn bad(&self, r: String) -> Error {
        Error::malformed(self.path, "PyTorch checkpoint (pickle)", r)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(e) => {
                let s = &self.data[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(self.bad("truncated pickle".into())),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.bad("unterminated GLOBAL name".into()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.bad("pickle stack too deep".into()));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| self.bad("pickle stack underflow".into()))
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let i = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| self.bad("pickle MARK missing".into()))?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, k: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.bad("pickle memo too large".into()));
        }
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.bad("memoize on an empty stack".into()))?;
        self.memo.insert(k, v);
        Ok(())
    }

    fn memo_get(&mut self, k: u32) -> Result<()> {
        let v = self
            .memo
            .get(&k)
            .cloned()
            .ok_or_else(|| self.bad(format!("memo key {k} missing")))?;
        self.push(v)
    }

    /// `callable(*args)` for the few callables given meaning; anything else is inert.
    fn reduce(&mut self, func: Value, args: Value) -> Result<Value> {
        let Value::Global(name) = &func else {
            return Ok(Value::Opaque(format!("{func:?}")));
        };
        let args = match args {
            Value::Tuple(a) => a,
            _ => return Err(self.bad(format!("{name}: arguments are not a tuple"))),
        };
        match name.as_str() {
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
                let ints = |v: &Value| -> Option<Vec<usize>> {
                    match v {
                        Value::Tuple(x) => x
                            .iter()
                            .map(|e| match e {
                                Value::Int(i) if *i >= 0 => Some(*i as usize),
                                _ => None,
                            })
                            .collect(),
                        _ => None,
                    }
                };
                let (
                    Some(Value::Storage { dtype, key }),
                    Some(Value::Int(off)),
                    Some(size),
                    Some(stride),
                ) = (
                    args.first(),
                    args.get(1),
                    args.get(2).and_then(ints),
                    args.get(3).and_then(ints),
                )
                else {
                    return Err(self.bad(format!("{name}: unexpected arguments")));
                };
                if size.len() != stride.len() || *off < 0 {
                    return Err(self.bad(format!("{name}: size and stride disagree")));
                }
                Ok(Value::Tensor(Box::new(TensorRef {
                    dtype: *dtype,
                    key: key.clone(),
                    offset: *off as usize,
                    size,
                    stride,
                })))
            }
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                Ok(args.into_iter().next().unwrap_or(Value::None))
            }
            "collections.OrderedDict" => Ok(Value::Dict(vec![])),
            other => {
                self.opaque.push(other.to_string());
                Ok(Value::Opaque(other.to_string()))
            }
        }
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.push(Value::Mark)?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'}' => self.push(Value::Dict(vec![]))?,
                b']' => self.push(Value::List(vec![]))?,
                b')' => self.push(Value::Tuple(vec![]))?,
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(self.bad("integer wider than 64 bits".into()));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xFFu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?
                }
                b'X' | 0x8c | 0x8d | b'U' | b'T' | b'B' | b'C' => {
                    let n = match op {
                        b'X' | b'T' | b'B' => self.u32()? as usize,
                        0x8d => {
                            let b = self.take(8)?;
                            let mut a = [0u8; 8];
                            a.copy_from_slice(b);
                            usize::try_from(u64::from_le_bytes(a))
                                .map_err(|_| self.bad("string too long".into()))?
                        }
                        _ => self.u8()? as usize,
                    };
                    let b = self.take(n)?;
                    let v = match op {
                        b'B' | b'C' => Value::Bytes(b.to_vec()),
                        _ => Value::Str(String::from_utf8_lossy(b).into_owned()),
                    };
                    self.push(v)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(format!("{module}.{name}")))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.push(Value::Global(format!("{m}.{n}")))?
                        }
                        _ => return Err(self.bad("STACK_GLOBAL of non-strings".into())),
                    }
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("pickle stack underflow".into()));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items);
                    self.push(Value::Dict(pairs))?
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Some(Value::List(l)) = self.stack.last_mut() {
                        l.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Some(Value::List(l)) = self.stack.last_mut() {
                        l.extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Some(Value::Dict(d)) = self.stack.last_mut() {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Some(Value::Dict(d)) = self.stack.last_mut() {
                        d.extend(pairs(items));
                    }
                }
                b'Q' => {
                    // Persistent id: ('storage', storage_type, key, location, numel).
                    let pid = self.pop()?;
                    let Value::Tuple(t) = pid else {
                        return Err(self.bad("persistent id is not a tuple".into()));
                    };
                    match (t.first(), t.get(1), t.get(2)) {
                        (
                            Some(Value::Str(kind)),
                            Some(Value::Global(ty)),
                            Some(Value::Str(key)),
                        ) if kind == "storage" => {
                            let dtype = storage_dtype(ty)
                                .ok_or_else(|| self.bad(format!("unknown storage type {ty}")))?;
                            self.push(Value::Storage {
                                dtype,
                                key: key.clone(),
                            })?
                        }
                        _ => return Err(self.bad(format!("unsupported persistent id {t:?}"))),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?
                }
                0x81 | 0x92 => {
                    // NEWOBJ / NEWOBJ_EX: an instance of some class; never constructed.
                    if op == 0x92 {
                        self.pop()?;
                    }
                    self.pop()?;
                    let cls = self.pop()?;
                    let name = match cls {
                        Value::Global(n) => n,
                        other => format!("{other:?}"),
                    };
                    self.opaque.push(name.clone());
                    self.push(Value::Opaque(name))?
                }
                b'b' => {
                    // BUILD: state for the object below; only meaningful for objects we do
                    // not build, so it is dropped (a state_dict's `_metadata` lands here).
                    self.pop()?;
                }
                0x8e..=0x91 => {
                    return Err(self.bad(format!(
                        "pickle opcode {op:#x} (sets/bytearrays) is not expected in a checkpoint"
                    )));
                }
                _ => {
                    return Err(self.bad(format!(
                        "pickle opcode {op:#x} at byte {} is not one a PyTorch checkpoint uses",
                        self.pos - 1
                    )))
                }
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Vec<(Value, Value)> {
    let mut it = items.into_iter();
    let mut out = vec![];
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

/// Reads the floating-point tensors of a `torch.save` file by name, converted to f32. A
/// training checkpoint (a dict with `model`, `state_dict`, `model_ema` or `module` holding
/// the weights) yields that inner state dict.
pub fn read(path: &Path) -> Result<(BTreeMap<String, Tensor>, TorchReport)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() >= 2 && bytes[0] == 0x80 {
        return Err(Error::malformed(
            path,
            "PyTorch checkpoint",
            "this is the legacy (pre-1.6) torch.save format, which is not read; re-save it with a \
             current PyTorch (`torch.save(torch.load(f, weights_only=True), f2)`) or as safetensors"
                .to_string(),
        ));
    }
    let zip = ZipArchive::parse(path, bytes)?;
    let pkl = zip
        .entries()
        .iter()
        .find(|e| e.name.ends_with("data.pkl"))
        .ok_or_else(|| {
            Error::malformed(
                path,
                "PyTorch checkpoint",
                "no data.pkl inside the archive".to_string(),
            )
        })?
        .clone();
    let prefix = pkl.name.trim_end_matches("data.pkl").to_string();
    let program = zip.read(&pkl)?;
    let mut m = Machine {
        data: &program,
        pos: 0,
        stack: vec![],
        memo: BTreeMap::new(),
        opaque: vec![],
        path,
    };
    let root = m.run()?;
    let mut report = TorchReport::default();
    let mut opaque = m.opaque;
    opaque.sort();
    opaque.dedup();
    report.opaque = opaque;
    let mut dict = match root {
        Value::Dict(d) => d,
        other => {
            return Err(Error::malformed(
                path,
                "PyTorch checkpoint",
                format!(
                    "the top level is not a dict of tensors but {}",
                    kind(&other)
                ),
            ))
        }
    };
    // A training checkpoint: take its weights.
    let has_tensors = dict.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    if !has_tensors {
        for key in [
            "model",
            "state_dict",
            "model_ema",
            "module",
            "model_state_dict",
        ] {
            let inner = dict.iter().position(|(k, v)| {
                matches!(k, Value::Str(s) if s == key) && matches!(v, Value::Dict(_))
            });
            if let Some(i) = inner {
                let (_, v) = dict.swap_remove(i);
                if let Value::Dict(d) = v {
                    dict = d;
                    report.inner_key = Some(key.to_string());
                }
                break;
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut converted = BTreeMap::<&str, usize>::new();
    for (k, v) in dict {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
            continue;
        };
        if t.dtype == Dtype::Other {
            report.skipped.push(name);
            continue;
        }
        let entry = zip
            .find(&format!("{prefix}data/{}", t.key))
            .ok_or_else(|| {
                Error::malformed(
                    path,
                    "PyTorch checkpoint",
                    format!("tensor `{name}`: storage {} is missing", t.key),
                )
            })?
            .clone();
        let storage = t.dtype.decode(&zip.read(&entry)?);
        // A lying shape (or a zero stride) must not make us allocate without bound.
        let numel = t
            .size
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                Error::malformed(
                    path,
                    "PyTorch checkpoint",
                    format!("tensor `{name}` claims shape {:?}, too large", t.size),
                )
            })?;
        // Gather by strides (checked against the storage) into a contiguous buffer.
        let max_index = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&s, &st)| {
                acc.checked_add(s.saturating_sub(1).checked_mul(st)?)
            });
        if numel > 0 && max_index.is_none_or(|mi| mi >= storage.len()) {
            return Err(Error::malformed(
                path,
                "PyTorch checkpoint",
                format!(
                    "tensor `{name}` of shape {:?} reaches past its storage ({} elements)",
                    t.size,
                    storage.len()
                ),
            ));
        }
        let mut data = Vec::with_capacity(numel);
        let mut idx = vec![0usize; t.size.len()];
        for _ in 0..numel {
            let flat = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            data.push(storage[flat]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        match t.dtype {
            Dtype::F16 => *converted.entry("f16").or_default() += 1,
            Dtype::BF16 => *converted.entry("bf16").or_default() += 1,
            Dtype::F64 => *converted.entry("f64").or_default() += 1,
            _ => {}
        }
        out.insert(name, Tensor::new(t.size.clone(), data)?);
    }
    report.converted = converted
        .into_iter()
        .map(|(k, n)| format!("converted {n} {k} tensor(s) to f32"))
        .collect();
    Ok((out, report))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Tensor(_) => "a single tensor",
        Value::Opaque(_) => "an object of another type",
        _ => "a plain value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::zip::stored_zip;

    /// A pickle whose tensor claims 2^40 elements over a 1-element storage with stride 0: an
    /// error before anything that size is allocated.
    #[test]
    fn a_lying_shape_is_refused_before_allocating() {
        let mut p = vec![0x80, 2, b'}'];
        let ustr = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend_from_slice(&(s.len() as u32).to_le_bytes());
            p.extend_from_slice(s.as_bytes());
        };
        ustr(&mut p, "w");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        ustr(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        ustr(&mut p, "0");
        ustr(&mut p, "cpu");
        p.extend_from_slice(&[b'K', 1, b't', b'Q', b'K', 0]);
        p.extend_from_slice(&[0x8a, 6, 0, 0, 0, 0, 0, 1, 0x85]); // (2^40,)
        p.extend_from_slice(&[b'K', 0, 0x85, 0x89, b')', b't', b'R', b's', b'.']);
        let zip = stored_zip(&[("archive/data.pkl", &p), ("archive/data/0", &[0u8; 4])]);
        let path = std::env::temp_dir().join(format!("vitrs-lying-{}.pth", std::process::id()));
        std::fs::write(&path, zip).unwrap();
        let e = read(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(e.contains("too large"), "{e}");
    }
}
