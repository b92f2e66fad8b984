"""What several test modules share: real local servers, temporary pipeline repos, a tiny extractor."""
