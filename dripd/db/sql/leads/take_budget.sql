-- Take one post of a client's budget: at most $3 posts in any interval of $4. The row keeps
-- the times of the posts taken in the window that ends now, oldest first; a post is taken
-- (`taken`) while fewer than $3 fall in it. A concurrent take of the same client waits for
-- this one's row lock and then sees its post, so every daemon shares the one budget.
-- `retry_at`: when a refused client's oldest counted post leaves the window.
-- $1 client, $2 now, $3 limit, $4 window
INSERT INTO dripd.lead_budgets AS b (client, posts, taken)
VALUES ($1, ARRAY[$2::timestamptz], true)
ON CONFLICT (client) DO UPDATE
SET taken = (
        SELECT count(*) FROM unnest(b.posts) AS p WHERE p > $2::timestamptz - $4::interval
    ) < $3::integer,
    posts = CASE
        WHEN (
            SELECT count(*) FROM unnest(b.posts) AS p WHERE p > $2::timestamptz - $4::interval
        ) < $3::integer
        THEN array(
            SELECT p FROM unnest(b.posts) AS p
            WHERE p > $2::timestamptz - $4::interval ORDER BY p
        ) || $2::timestamptz
        ELSE array(
            SELECT p FROM unnest(b.posts) AS p
            WHERE p > $2::timestamptz - $4::interval ORDER BY p
        )
    END
RETURNING
    b.taken,
    CASE WHEN b.taken THEN NULL
         ELSE b.posts[cardinality(b.posts) - $3::integer + 1] + $4::interval
    END AS retry_at
