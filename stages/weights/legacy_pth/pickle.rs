//! A small pickle interpreter: the opcodes torch's legacy writer emits, objects in an
//! arena, nothing ever executed (see the module header of `legacy_pth`).

use anyhow::{Result, anyhow, bail, ensure};
use std::collections::HashMap;

use super::container::*;

pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => bail!(
                "truncated file: {} needs {n} bytes at byte {}, but the file ends at byte {}",
                what(),
                self.pos,
                self.bytes.len()
            ),
        }
    }
    pub(super) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, || "an opcode argument".into())?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, || "an opcode argument".into())?
                .try_into()
                .unwrap(),
        ))
    }
    pub(super) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, || "an opcode argument".into())?
                .try_into()
                .unwrap(),
        ))
    }
    pub(super) fn line(&mut self) -> Result<&'a str> {
        let rest = &self.bytes[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            bail!(
                "truncated file: unterminated GLOBAL name at byte {}",
                self.pos
            );
        };
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("GLOBAL name is not UTF-8"))
    }
}

pub(super) type Id = usize;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// A `LONG1`/`LONG4` too wide for i64: little-endian two's complement, as pickled.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// The result of a call this reader does not interpret; only its callee is kept.
    Opaque(String),
}

/// One unpickled object graph: the arena and the root.
pub(super) struct Pickle {
    pub(super) arena: Vec<Obj>,
    pub(super) root: Id,
}

impl Pickle {
    pub(super) fn get(&self, id: Id) -> &Obj {
        &self.arena[id]
    }

    pub(super) fn describe(&self, id: Id) -> String {
        self.describe_obj(self.get(id))
    }

    pub(super) fn describe_obj(&self, o: &Obj) -> String {
        match o {
            Obj::None => "None".into(),
            Obj::Bool(b) => format!("bool {b}"),
            Obj::Int(i) => format!("int {i:#x}"),
            Obj::BigInt(b) => {
                let hex: String = b.iter().rev().map(|x| format!("{x:02x}")).collect();
                format!("int 0x{hex} (two's complement)")
            }
            Obj::Float(f) => format!("float {f}"),
            Obj::Str(s) => format!("str {s:?}"),
            Obj::Bytes(b) => format!("{} bytes", b.len()),
            Obj::Global { module, name } => format!("global {module}.{name}"),
            Obj::Tuple(v) => format!("a tuple of {}", v.len()),
            Obj::List(v) => format!("a list of {}", v.len()),
            Obj::Dict(v) => format!("a dict of {}", v.len()),
            Obj::Storage(s) => format!("a {:?} storage", s.kind),
            Obj::Tensor(_) => "a tensor".into(),
            Obj::Opaque(c) => format!("the result of calling {c}"),
        }
    }

    /// Runs one pickle from the cursor through its STOP.
    pub(super) fn load(cur: &mut Cursor<'_>, what: &str) -> Result<Self> {
        let mut m = Machine {
            arena: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        };
        loop {
            let at = cur.pos;
            let op = cur.take(1, || format!("the {what} pickle"))?[0];
            match m.step(op, cur) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "{what} pickle: opcode {} at byte {at}",
                        opcode_name(op)
                    )));
                }
            }
        }
        ensure!(
            m.stack.len() == 1 && m.marks.is_empty(),
            "{what} pickle: STOP with {} objects and {} marks on the stack, expected one object",
            m.stack.len(),
            m.marks.len()
        );
        let root = m.stack[0];
        Ok(Pickle {
            arena: m.arena,
            root,
        })
    }
}

pub(super) fn opcode_name(op: u8) -> String {
    let name = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'(' => "MARK",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        b'd' => "DICT",
        b'l' => "LIST",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        b'U' => "SHORT_BINSTRING",
        b'T' => "BINSTRING",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'N' => "NONE",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        b'G' => "BINFLOAT",
        _ => "",
    };
    if name.is_empty() {
        format!("{op:#04x}")
    } else {
        format!("{name} ({op:#04x})")
    }
}

pub(super) struct Machine {
    pub(super) arena: Vec<Obj>,
    pub(super) stack: Vec<Id>,
    /// Stack heights at each MARK (Python's "metastack").
    pub(super) marks: Vec<usize>,
    pub(super) memo: HashMap<u32, Id>,
}

impl Machine {
    pub(super) fn alloc(&mut self, o: Obj) -> Id {
        self.arena.push(o);
        self.arena.len() - 1
    }
    pub(super) fn push(&mut self, o: Obj) {
        let id = self.alloc(o);
        self.stack.push(id);
    }
    pub(super) fn pop(&mut self) -> Result<Id> {
        if self.marks.last().is_some_and(|&h| h >= self.stack.len()) {
            bail!("pop across a MARK");
        }
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("pop from an empty stack"))
    }
    pub(super) fn top(&self) -> Result<Id> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| anyhow!("empty stack"))
    }
    pub(super) fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let h = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("no MARK to pop to"))?;
        Ok(self.stack.split_off(h))
    }
    pub(super) fn memo_get(&self, k: u32) -> Result<Id> {
        self.memo
            .get(&k)
            .copied()
            .ok_or_else(|| anyhow!("memo key {k} was never stored"))
    }
    pub(super) fn str_arg(&self, id: Id) -> Option<&str> {
        match &self.arena[id] {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }
    pub(super) fn int_arg(&self, id: Id, what: &str) -> Result<usize> {
        match self.arena[id] {
            Obj::Int(i) if i >= 0 => Ok(i as usize),
            ref o => bail!("{what}: expected a non-negative int, found {o:?}"),
        }
    }
    pub(super) fn ints_arg(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        match &self.arena[id] {
            Obj::Tuple(v) | Obj::List(v) => v.iter().map(|&i| self.int_arg(i, what)).collect(),
            o => bail!("{what}: expected a tuple of ints, found {o:?}"),
        }
    }

    /// Executes one opcode; `Ok(true)` on STOP.
    pub(super) fn step(&mut self, op: u8, cur: &mut Cursor<'_>) -> Result<bool> {
        match op {
            0x80 => {
                let v = cur.u8()?;
                ensure!(v <= 5, "pickle protocol {v} is newer than any known");
            }
            0x95 => {
                // Frames only group opcodes for buffered reading; the content is inline.
                cur.take(8, || "the FRAME length".into())?;
            }
            b'.' => return Ok(true),
            b'c' => {
                let module = cur.line()?.to_owned();
                let name = cur.line()?.to_owned();
                self.push(Obj::Global { module, name });
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (self.str_arg(module), self.str_arg(name)) {
                    (Some(m), Some(n)) => {
                        let o = Obj::Global {
                            module: m.to_owned(),
                            name: n.to_owned(),
                        };
                        self.push(o)
                    }
                    _ => bail!("STACK_GLOBAL needs two str"),
                }
            }
            b'q' => {
                let k = cur.u8()? as u32;
                self.memo.insert(k, self.top()?);
            }
            b'r' => {
                let k = cur.u32()?;
                self.memo.insert(k, self.top()?);
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memo.insert(k, self.top()?);
            }
            b'h' => {
                let id = self.memo_get(cur.u8()? as u32)?;
                self.stack.push(id);
            }
            b'j' => {
                let id = self.memo_get(cur.u32()?)?;
                self.stack.push(id);
            }
            b'(' => self.marks.push(self.stack.len()),
            b'}' => self.push(Obj::Dict(Vec::new())),
            b']' => self.push(Obj::List(Vec::new())),
            b')' => self.push(Obj::Tuple(Vec::new())),
            b'd' => {
                let items = self.pop_mark()?;
                ensure!(items.len() % 2 == 0, "DICT with an odd number of items");
                let pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                self.push(Obj::Dict(pairs));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Obj::List(items));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Obj::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Obj::Tuple(items));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.dict_extend(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                self.dict_extend(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.list_extend(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.list_extend(items)?;
            }
            b'J' => {
                let v = i32::from_le_bytes(cur.take(4, || "BININT".into())?.try_into().unwrap());
                self.push(Obj::Int(v as i64));
            }
            b'K' => {
                let v = cur.u8()?;
                self.push(Obj::Int(v as i64));
            }
            b'M' => {
                let v = cur.u16()?;
                self.push(Obj::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    cur.u8()? as usize
                } else {
                    let n = i32::from_le_bytes(cur.take(4, || "LONG4".into())?.try_into().unwrap());
                    ensure!(n >= 0, "LONG4 with negative length");
                    n as usize
                };
                let b = cur.take(n, || "a LONG1/LONG4 payload".into())?;
                if n <= 8 {
                    // Sign-extend little-endian two's complement to i64.
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    let mut full = [fill; 8];
                    full[..n].copy_from_slice(b);
                    self.push(Obj::Int(i64::from_le_bytes(full)));
                } else {
                    self.push(Obj::BigInt(b.to_vec()));
                }
            }
            b'X' | 0x8c => {
                let n = if op == b'X' {
                    cur.u32()? as usize
                } else {
                    cur.u8()? as usize
                };
                let b = cur.take(n, || "a str payload".into())?;
                let s = std::str::from_utf8(b).map_err(|_| anyhow!("str is not valid UTF-8"))?;
                self.push(Obj::Str(s.to_owned()));
            }
            b'U' | b'T' => {
                // Python 2 `str`: bytes. Torch's keys and names are ASCII, so keep valid UTF-8
                // as a str (what Python 3 unpickling with encoding="utf-8" gives).
                let n = if op == b'U' {
                    cur.u8()? as usize
                } else {
                    let n =
                        i32::from_le_bytes(cur.take(4, || "BINSTRING".into())?.try_into().unwrap());
                    ensure!(n >= 0, "BINSTRING with negative length");
                    n as usize
                };
                let b = cur.take(n, || "a byte-string payload".into())?;
                match std::str::from_utf8(b) {
                    Ok(s) => self.push(Obj::Str(s.to_owned())),
                    Err(_) => self.push(Obj::Bytes(b.to_vec())),
                }
            }
            0x88 => self.push(Obj::Bool(true)),
            0x89 => self.push(Obj::Bool(false)),
            b'N' => self.push(Obj::None),
            b'G' => {
                // Pickle floats are big-endian, unlike its ints.
                let v = f64::from_be_bytes(cur.take(8, || "BINFLOAT".into())?.try_into().unwrap());
                self.push(Obj::Float(v));
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let o = self.call(callable, args)?;
                self.push(o);
            }
            b'b' => {
                // BUILD sets an instance's state; for the OrderedDict of a state dict that is
                // `_metadata` (module versions), which tensors do not need. Drop it.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let s = self.persistent_load(pid)?;
                self.push(Obj::Storage(s));
            }
            _ => bail!("unsupported pickle opcode (not one torch's legacy writer emits)"),
        }
        Ok(false)
    }

    pub(super) fn dict_extend(&mut self, items: Vec<Id>) -> Result<()> {
        let d = self.top()?;
        match &mut self.arena[d] {
            Obj::Dict(v) => {
                v.extend(items.chunks_exact(2).map(|c| (c[0], c[1])));
                Ok(())
            }
            o => bail!("setting items on {o:?}, expected a dict"),
        }
    }

    pub(super) fn list_extend(&mut self, items: Vec<Id>) -> Result<()> {
        let l = self.top()?;
        match &mut self.arena[l] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            o => bail!("appending to {o:?}, expected a list"),
        }
    }

    /// REDUCE / NEWOBJ: interprets the few callables torch state dicts use, by name only.
    pub(super) fn call(&self, callable: Id, args: Id) -> Result<Obj> {
        let Obj::Global { module, name } = &self.arena[callable] else {
            return Ok(Obj::Opaque(format!(
                "a non-global {:?}",
                self.arena[callable]
            )));
        };
        let args_v: &[Id] = match &self.arena[args] {
            Obj::Tuple(v) => v,
            o => bail!("{module}.{name}: arguments are {o:?}, expected a tuple"),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") if args_v.is_empty() => Obj::Dict(Vec::new()),
            // (storage, storage_offset, size, stride[, requires_grad, backward_hooks[, metadata]])
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                ensure!(
                    args_v.len() >= 4,
                    "{name}: {} arguments, expected at least 4",
                    args_v.len()
                );
                let Obj::Storage(storage) = &self.arena[args_v[0]] else {
                    bail!(
                        "{name}: first argument is {:?}, expected a storage",
                        self.arena[args_v[0]]
                    );
                };
                Obj::Tensor(TensorRef {
                    storage: storage.clone(),
                    offset: self.int_arg(args_v[1], "storage_offset")?,
                    size: self.ints_arg(args_v[2], "size")?,
                    stride: self.ints_arg(args_v[3], "stride")?,
                })
            }
            // nn.Parameter(data, requires_grad, backward_hooks): the data is what we want.
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
                if matches!(
                    args_v.first().map(|&a| &self.arena[a]),
                    Some(Obj::Tensor(_))
                ) =>
            {
                self.arena[args_v[0]].clone()
            }
            _ => Obj::Opaque(format!("{module}.{name}")),
        })
    }

    /// `('storage', torch.<Kind>Storage, key, location, numel, view_metadata)`.
    pub(super) fn persistent_load(&self, pid: Id) -> Result<StorageRef> {
        let Obj::Tuple(t) = &self.arena[pid] else {
            bail!(
                "persistent id is {:?}, expected a ('storage', ...) tuple",
                self.arena[pid]
            );
        };
        ensure!(
            t.len() == 6 && self.str_arg(t[0]) == Some("storage"),
            "persistent id {:?} is not a 6-tuple starting with 'storage'",
            t.iter().map(|&i| &self.arena[i]).collect::<Vec<_>>()
        );
        let kind = match &self.arena[t[1]] {
            Obj::Global { module, name } if module == "torch" => StorageKind::from_class(name)
                .ok_or_else(|| anyhow!("unsupported storage type torch.{name}"))?,
            o => bail!("storage type is {o:?}, expected a torch.<Type>Storage global"),
        };
        let key = self
            .str_arg(t[2])
            .ok_or_else(|| anyhow!("storage key is {:?}, expected a str", self.arena[t[2]]))?
            .to_owned();
        let numel = self.int_arg(t[4], "storage numel")?;
        let view = match &self.arena[t[5]] {
            Obj::None => None,
            Obj::Tuple(v) if v.len() == 3 => Some((
                self.int_arg(v[1], "view offset")?,
                self.int_arg(v[2], "view size")?,
            )),
            o => bail!("storage view metadata is {o:?}, expected None or (key, offset, size)"),
        };
        Ok(StorageRef {
            kind,
            key,
            numel,
            view,
        })
    }
}
