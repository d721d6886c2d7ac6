"""Small pieces shared by the attention modules."""
