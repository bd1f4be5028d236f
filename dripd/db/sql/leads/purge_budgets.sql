-- Budgets whose newest post is older than $1 count nothing any more. $1 before
DELETE FROM dripd.lead_budgets
WHERE cardinality(posts) = 0 OR posts[cardinality(posts)] < $1
