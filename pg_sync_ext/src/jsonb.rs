//! Values to jsonb exactly as `to_jsonb` types them, called directly from Rust. The capture
//! converts rows with it and the WAL path columns, so a consumer cannot tell the two apart.

use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::ffi::CStr;

/// `to_jsonb` for values of one type. It takes `anyelement`, so a direct call needs an
/// expression that names the argument's type (RECORDOID for records of any shape).
pub struct ToJsonb {
    fmgr: *mut pg_sys::FmgrInfo,
}

impl ToJsonb {
    /// # Safety
    /// `type_oid` must be a type that exists; the function info lives in `context`, which
    /// must outlive the result.
    pub unsafe fn new(type_oid: pg_sys::Oid, context: pg_sys::MemoryContext) -> Self {
        PgMemoryContexts::For(context).switch_to(|_| {
            let fmgr = pg_sys::palloc0(size_of::<pg_sys::FmgrInfo>()).cast::<pg_sys::FmgrInfo>();
            let function = pg_sys::Oid::from(pg_sys::F_TO_JSONB);
            pg_sys::fmgr_info_cxt(function, fmgr, context);
            let argument = pg_sys::makeNullConst(type_oid, -1, pg_sys::InvalidOid);
            let arguments = pg_sys::lappend(std::ptr::null_mut(), argument.cast());
            (*fmgr).fn_expr = pg_sys::makeFuncExpr(
                function,
                pg_sys::JSONBOID,
                arguments,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            )
            .cast();
            ToJsonb { fmgr }
        })
    }

    /// # Safety
    /// `value` must be a non-null datum of the type this was made for.
    pub unsafe fn call(&self, value: pg_sys::Datum) -> pg_sys::Datum {
        pg_sys::FunctionCall1Coll(self.fmgr, pg_sys::InvalidOid, value)
    }
}

/// A jsonb datum as JSON, numbers kept exact (serde_json's arbitrary_precision).
///
/// # Safety
/// `jsonb` must be a jsonb datum.
pub unsafe fn to_value(jsonb: pg_sys::Datum) -> serde_json::Value {
    let text =
        pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(jsonb)]).expect("jsonb_out");
    let text = CStr::from_ptr(text.cast_mut_ptr()).to_string_lossy();
    serde_json::from_str(&text).expect("jsonb_out writes JSON")
}
