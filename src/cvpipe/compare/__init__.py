"""``cvpipe compare``: the leaderboard of the evaluated bundles and the promotion of the winner
to ``models/best`` (:mod:`cvpipe.compare.stage`)."""
