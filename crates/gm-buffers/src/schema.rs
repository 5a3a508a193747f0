//! Transition schemas: named fields with a dtype and a shape, and whether a
//! field is stored per transition ([`FieldKind::Plain`]) or as an
//! observation whose `next_` twin and sliding-window overlap are
//! de-duplicated ([`FieldKind::Observation`]).

use crate::error::{Error, Result};
use std::fmt;

/// Element type of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Byte.
    U8,
    /// Boolean, stored as one byte (0 or 1).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// Lower-case name (`"f32"`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    pub(crate) const fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::F64 => 2,
            DType::I32 => 3,
            DType::I64 => 4,
            DType::U8 => 5,
            DType::Bool => 6,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => DType::F32,
            2 => DType::F64,
            3 => DType::I32,
            4 => DType::I64,
            5 => DType::U8,
            6 => DType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that can be stored in a field: `f32`, `f64`, `i32`, `i64`,
/// `u8`, `bool`.
pub trait Element:
    bytemuck::NoUninit + bytemuck::CheckedBitPattern + Copy + Send + Sync + 'static + sealed::Sealed
{
    /// The matching [`DType`].
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: DType = DType::$d; }
    )*};
}
element!(f32 => F32, f64 => F64, i32 => I32, i64 => I64, u8 => U8, bool => Bool);

/// How a field is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Stored once per transition (action, reward, done, ...).
    Plain,
    /// An observation. The caller passes the observation and its `next_`
    /// twin at every add; the buffer stores the field as a stream of rows
    /// (the shape without its first axis when `window > 1`, the whole shape
    /// when `window == 1`) and keeps a row only once however many
    /// observations share it: `next_obs` of step t and `obs` of step t+1 are
    /// the same rows, and consecutive sliding windows share all but their
    /// newest rows. Overlap is found by comparing bytes, so any input is
    /// stored exactly; streams that do not overlap simply cost more rows.
    Observation {
        /// Rows per observation (the first axis of the shape), 1 for a frame.
        window: usize,
    },
}

/// One named field of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) kind: FieldKind,
}

impl FieldSpec {
    /// A field stored once per transition. `shape` may be empty (a scalar).
    pub fn plain(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            kind: FieldKind::Plain,
        }
    }

    /// A frame observation of `shape` whose `next_` twin is de-duplicated
    /// against the next transition's observation (like cpprb's `next_of`).
    pub fn obs(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            kind: FieldKind::Observation { window: 1 },
        }
    }

    /// A sliding-window observation: `shape[0]` is the time axis (the window
    /// length), the rest is one row (e.g. `[48, 8]`: 48 bars of 8 features).
    /// Consecutive windows that slide by any number of rows share storage.
    pub fn window(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Self {
        let window = shape.first().copied().unwrap_or(0);
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            kind: FieldKind::Observation { window },
        }
    }

    /// The field's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape of one item (without the batch axis).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Storage kind.
    pub fn kind(&self) -> FieldKind {
        self.kind
    }
    /// Elements per item (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Rows per item for observations (1 for plain fields).
    pub(crate) fn window_len(&self) -> usize {
        match self.kind {
            FieldKind::Plain => 1,
            FieldKind::Observation { window } => window,
        }
    }
    /// Elements per stored row (observations) or per item (plain).
    pub(crate) fn row_numel(&self) -> usize {
        self.numel() / self.window_len().max(1)
    }
}

/// One column the caller passes to `add` (or gets back in a batch): a name,
/// a dtype and the number of elements per transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    /// Column name: the field name, or `next_<name>` for an observation's twin.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of one item.
    pub shape: Vec<usize>,
    /// Elements per transition.
    pub numel: usize,
    /// Index of the field in the schema.
    pub field: usize,
    /// True for the `next_` twin of an observation.
    pub is_next: bool,
}

/// The fields of a transition, in order.
///
/// The input and batch columns follow the field order; every observation
/// field contributes two columns, `name` then `next_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    fields: Vec<FieldSpec>,
    columns: Vec<ColumnSpec>,
}

impl Schema {
    /// Builds and validates a schema: at least one field, unique non-empty
    /// names (including the generated `next_` names), no zero-sized axes,
    /// windows with a time axis.
    pub fn new(fields: Vec<FieldSpec>) -> Result<Self> {
        if fields.is_empty() {
            return Err(Error::Schema("a schema needs at least one field".into()));
        }
        let mut columns = Vec::new();
        for (i, f) in fields.iter().enumerate() {
            if f.name.is_empty() {
                return Err(Error::Schema(format!("field {i} has an empty name")));
            }
            if f.shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .is_none_or(|n| n > isize::MAX as usize / 8)
            {
                return Err(Error::Schema(format!(
                    "field {:?}: shape {:?} is too large",
                    f.name, f.shape
                )));
            }
            if f.shape.contains(&0) {
                return Err(Error::Schema(format!(
                    "field {:?} has a zero-sized axis in shape {:?}",
                    f.name, f.shape
                )));
            }
            if let FieldKind::Observation { window } = f.kind {
                if window == 0 {
                    return Err(Error::Schema(format!(
                        "window field {:?} needs a time axis: shape [len, features...], got {:?}",
                        f.name, f.shape
                    )));
                }
                if window > u16::MAX as usize {
                    return Err(Error::Schema(format!(
                        "window field {:?}: window {window} exceeds {}",
                        f.name,
                        u16::MAX
                    )));
                }
            }
            let mut push = |name: String, is_next: bool| {
                columns.push(ColumnSpec {
                    name,
                    dtype: f.dtype,
                    shape: f.shape.clone(),
                    numel: f.numel(),
                    field: i,
                    is_next,
                })
            };
            push(f.name.clone(), false);
            if matches!(f.kind, FieldKind::Observation { .. }) {
                push(format!("next_{}", f.name), true);
            }
        }
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].iter().any(|d| d.name == c.name) {
                return Err(Error::Schema(format!("duplicate column name {:?}", c.name)));
            }
        }
        Ok(Self { fields, columns })
    }

    /// The fields in order.
    pub fn fields(&self) -> &[FieldSpec] {
        &self.fields
    }

    /// The input/batch columns in order (observations contribute two).
    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }

    /// Position of a column by name.
    pub fn column_index(&self, name: &str) -> Result<usize> {
        self.columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| Error::UnknownField(name.to_owned()))
    }

    /// Logical bytes of one transition as the caller sees it (all columns).
    pub fn transition_bytes(&self) -> usize {
        self.columns.iter().map(|c| c.numel * c.dtype.size()).sum()
    }

    /// True when some field is an observation (stored as a row stream).
    pub fn has_observations(&self) -> bool {
        self.fields
            .iter()
            .any(|f| matches!(f.kind, FieldKind::Observation { .. }))
    }

    /// Heap bytes this schema owns (names, shapes, tables).
    pub(crate) fn heap_bytes(&self) -> usize {
        let f: usize = self
            .fields
            .iter()
            .map(|f| f.name.capacity() + f.shape.capacity() * 8)
            .sum();
        let c: usize = self
            .columns
            .iter()
            .map(|c| c.name.capacity() + c.shape.capacity() * 8)
            .sum();
        f + c
            + self.fields.capacity() * std::mem::size_of::<FieldSpec>()
            + self.columns.capacity() * std::mem::size_of::<ColumnSpec>()
    }

    pub(crate) fn column_names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A borrowed input column: the elements of one column for one transition
/// (`add`) or for several transitions back to back (`add_batch`).
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    pub(crate) dtype: DType,
    pub(crate) bytes: &'a [u8],
    pub(crate) len: usize,
}

impl<'a> Column<'a> {
    /// Wraps a slice.
    pub fn new<T: Element>(s: &'a [T]) -> Self {
        Self {
            dtype: T::DTYPE,
            bytes: bytemuck::cast_slice(s),
            len: s.len(),
        }
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a, T: Element> From<&'a [T]> for Column<'a> {
    fn from(s: &'a [T]) -> Self {
        Column::new(s)
    }
}

impl<'a, T: Element, const N: usize> From<&'a [T; N]> for Column<'a> {
    fn from(s: &'a [T; N]) -> Self {
        Column::new(&s[..])
    }
}

impl<'a, T: Element> From<&'a Vec<T>> for Column<'a> {
    fn from(s: &'a Vec<T>) -> Self {
        Column::new(&s[..])
    }
}

/// Shorthand for [`Column::new`].
pub fn col<T: Element>(s: &[T]) -> Column<'_> {
    Column::new(s)
}

/// Validates input columns for `items` transitions against `schema`.
pub(crate) fn check_columns(schema: &Schema, cols: &[Column<'_>], items: usize) -> Result<()> {
    let specs = schema.columns();
    if cols.len() != specs.len() {
        return Err(Error::ColumnCount {
            expected: specs.len(),
            got: cols.len(),
            names: schema.column_names(),
        });
    }
    for (c, s) in cols.iter().zip(specs) {
        if c.dtype != s.dtype {
            return Err(Error::DType {
                field: s.name.clone(),
                expected: s.dtype.name(),
                got: c.dtype.name(),
            });
        }
        if c.len != s.numel * items {
            return Err(Error::Shape {
                field: s.name.clone(),
                expected: s.numel * items,
                per_item: s.numel,
                items,
                got: c.len,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trading() -> Schema {
        Schema::new(vec![
            FieldSpec::window("win48", DType::F32, &[48, 8]),
            FieldSpec::obs("extra", DType::F32, &[13]),
            FieldSpec::plain("action", DType::I64, &[]),
            FieldSpec::plain("done", DType::Bool, &[]),
        ])
        .unwrap()
    }

    #[test]
    fn observations_get_next_twins_in_order() {
        let s = trading();
        let names: Vec<_> = s.columns().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "win48",
                "next_win48",
                "extra",
                "next_extra",
                "action",
                "done"
            ]
        );
        assert_eq!(s.fields()[0].row_numel(), 8);
        assert_eq!(s.fields()[1].row_numel(), 13);
        assert_eq!(s.transition_bytes(), 2 * 384 * 4 + 2 * 13 * 4 + 8 + 1);
        assert_eq!(s.column_index("next_extra").unwrap(), 3);
        assert!(matches!(
            s.column_index("nope"),
            Err(Error::UnknownField(_))
        ));
    }

    #[test]
    fn bad_schemas_are_rejected_with_the_reason() {
        let e = Schema::new(vec![]).unwrap_err();
        assert!(e.to_string().contains("at least one field"));
        let e = Schema::new(vec![
            FieldSpec::obs("o", DType::F32, &[3]),
            FieldSpec::plain("next_o", DType::F32, &[3]),
        ])
        .unwrap_err();
        assert!(
            e.to_string().contains("duplicate column name \"next_o\""),
            "{e}"
        );
        let e = Schema::new(vec![FieldSpec::plain("x", DType::F32, &[4, 0])]).unwrap_err();
        assert!(e.to_string().contains("zero-sized"), "{e}");
        let e = Schema::new(vec![FieldSpec::window("w", DType::F32, &[])]).unwrap_err();
        assert!(e.to_string().contains("time axis"), "{e}");
        for shape in [&[1 << 32, 1 << 32, 1 << 32][..], &[4, 1 << 60]] {
            let e = Schema::new(vec![FieldSpec::window("w", DType::F64, shape)]).unwrap_err();
            assert!(e.to_string().contains("too large"), "{e}");
        }
    }

    #[test]
    fn column_checks_name_the_column() {
        let s = trading();
        let w = vec![0f32; 384];
        let x = vec![0f32; 13];
        let ok = [
            col(&w),
            col(&w),
            col(&x),
            col(&x),
            col(&[1i64]),
            col(&[false]),
        ];
        check_columns(&s, &ok, 1).unwrap();
        let e = check_columns(&s, &ok[..5], 1).unwrap_err();
        assert!(matches!(
            e,
            Error::ColumnCount {
                expected: 6,
                got: 5,
                ..
            }
        ));
        let bad = [
            col(&w),
            col(&w[..380]),
            col(&x),
            col(&x),
            col(&[1i64]),
            col(&[false]),
        ];
        let e = check_columns(&s, &bad, 1).unwrap_err();
        assert!(
            e.to_string().contains("next_win48") && e.to_string().contains("380"),
            "{e}"
        );
        let bad = [
            col(&w),
            col(&w),
            col(&x),
            col(&x),
            col(&[1i32]),
            col(&[false]),
        ];
        let e = check_columns(&s, &bad, 1).unwrap_err();
        assert!(matches!(e, Error::DType { ref field, .. } if field == "action"));
    }
}
