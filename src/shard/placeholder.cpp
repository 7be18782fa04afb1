// Placeholder until the shard layer lands.
