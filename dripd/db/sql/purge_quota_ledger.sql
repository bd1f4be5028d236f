-- Ledger rows of periods that began before $1 (long over: nothing reserves in them again).
DELETE FROM dripd.quota_ledger WHERE period_start < $1
