-- Tell every daemon that a circuit changed (they reload their breakers' state); $1 is the
-- payload, `circuit:<adapter id>`, so a listener can tell it from an adapter's edit.
SELECT pg_notify('dripd_adapters', $1)
